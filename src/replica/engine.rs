//! The replication engine: its own thread and tokio-uring runtime, so that
//! bulk sync work never delays the daemon's heartbeats, and its own port.
//!
//! The daemon tells it the node's role: as primary it tracks the mailstores
//! and streams changes to the peer; as secondary it accepts the primary's
//! sync connection and lands what arrives; otherwise it is idle.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::fence::Fence;
use super::fsops::Root;
use super::index::Index;
use super::receiver::{Receiver, RecvStore};
use super::sender::{CommitOutcome, CommitReq, DrainRequest, SendError, Sender, Store};
use super::stats::{ReplStats, ReplStatus};
use super::Excludes;
use crate::link::auth::{LinkKey, Side};
use crate::link::gate::{Gate, Limits};
use crate::link::{accept_authenticated, handshake, Backoff, Conn, LinkCtx, LinkStats};
use crate::queue::layout::Layout;
use crate::queue::push::{self, IngestStats, Ingester, PushReport};
use crate::tracker::{Notifier, Tracker, TrackerConfig};
use crate::wire::sync::SyncMsg;
use crate::wire::Channel;

/// What the engine should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineMode {
    Idle,
    Primary,
    Secondary,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_name: String,
    pub peer_name: String,
    pub key: LinkKey,
    /// Every replicated store, in configuration order.
    pub stores: Vec<StoreSpec>,
    pub exclude: Vec<String>,
    pub state_dir: PathBuf,
    pub sync_listen: SocketAddr,
    pub sync_peer: SocketAddr,
    pub verify_interval: Duration,
    /// `[replication] flush_alarm_ms` (receiving side).
    pub flush_alarm: Duration,
    pub durability: super::Durability,
    /// Large files go out by splice (`[replication] zero_copy`).
    pub zero_copy: bool,
    /// `[replication] allow_special_modes` (receiving side).
    pub allow_special_modes: bool,
    /// `[replication] watch_foreign_writes` (receiving side).
    pub watch_foreign_writes: bool,
    pub io_timeout: Duration,
    pub queue: QueueSettings,
}

/// One replicated tree: sent from `root` as primary, received into
/// `replica_root` as secondary (the same directory for a mailstore; a
/// replica kept outside the live queue for the queue itself).
#[derive(Debug, Clone)]
pub struct StoreSpec {
    pub name: String,
    pub root: PathBuf,
    pub replica_root: PathBuf,
    /// Send this store's changes at most this often (periodic queue sync);
    /// `None`: continuously.
    pub period: Option<Duration>,
    /// hasync's own directory for the receiving side (staging, conflicts):
    /// outside the live tree, on `replica_root`'s filesystem.
    pub internal: PathBuf,
    /// What the store is beyond a tree of files (`None`: just that).
    pub kind: Option<crate::config::StoreKind>,
}

/// Name of the store that replicates the mail queue (`queue.sync`).
pub const QUEUE_STORE: &str = "queue";

/// What the engine needs for the queue push (both directions).
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub layout: Layout,
    pub queue_dir: PathBuf,
    pub ledger: PathBuf,
    pub ledger_max_entries: usize,
    pub ledger_max_age: Duration,
    pub hook: Option<Vec<String>>,
    /// Staging of pushed messages (on `queue_dir`'s filesystem).
    pub staging: PathBuf,
}

/// How a queue push ended.
#[derive(Debug, Clone)]
pub enum PushOutcome {
    Done(PushReport),
    /// It no longer applies (this node is not secondary any more: it is
    /// primary again, its queue is the live queue).
    Cancelled(String),
    Failed(String),
}

/// Queue push state for status.
#[derive(Debug, Default)]
pub struct QueueState {
    pub running: std::sync::atomic::AtomicBool,
    pub report: Mutex<PushReport>,
    pub last_error: Mutex<Option<String>>,
    pub ingest: Mutex<IngestStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on sync address {addr} (replication.sync_listen): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad exclude pattern: {0}")]
    Exclude(#[from] globset::Error),
    #[error("this node is not primary: only the primary tracks changes")]
    NotPrimary,
    #[error(transparent)]
    Tracker(#[from] crate::tracker::TrackerError),
    #[error("cannot start the replication thread: {0}")]
    Thread(std::io::Error),
    #[error("the data path's fence: {0}")]
    Fence(#[from] super::fence::FenceError),
    #[error("{0}; move it away to start without them (the sources it names may then be deleted)")]
    Held(#[from] super::held::HeldError),
}

/// Handle owned by the daemon or an embedding application.
pub struct Engine {
    commit_tx: crossbeam_channel::Sender<CommitReq>,
    /// Wakes the sender when a commit request is queued.
    commit_wake: Arc<tokio::sync::Notify>,
    store_roots: Vec<PathBuf>,
    /// Where the node's durable marks live.
    state_dir: PathBuf,
    mode_tx: watch::Sender<EngineMode>,
    /// The highest epoch known: a primary's sessions carry it, sessions
    /// from below it are refused.
    fence: Arc<Fence>,
    /// Sync sessions this node has open as primary.
    sending: Arc<Sending>,
    push_tx: mpsc::UnboundedSender<u64>,
    promote_tx: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// A switchover's drain request, answered by the sender.
    drain: Arc<Mutex<Option<DrainRequest>>>,
    /// Primary tenures started (`set_mode(Primary)`), and the last one
    /// whose preparation (IMAP UIDs, takeover record) is done.
    primary_gen: Arc<std::sync::atomic::AtomicU64>,
    /// The epoch of the last primary tenure this node began (in memory:
    /// its former-primary mark says it durably, when it could be written).
    served: Arc<std::sync::atomic::AtomicU64>,
    /// The peer's last tenure known before that one (see
    /// [`Engine::promoting_from`]).
    floor: Arc<std::sync::atomic::AtomicU64>,
    prepared_rx: watch::Receiver<u64>,
    pub queue: Arc<QueueState>,
    stats: Arc<ReplStats>,
    notifier: Arc<Mutex<Option<Notifier>>>,
    resync: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The stores read ahead of the tracker and the walks as the node
    /// starts (`warm`); stopped with the engine.
    _warming: super::warm::Warming,
}

impl Engine {
    /// `done` receives the outcome of every queue push this engine runs.
    pub fn start(
        cfg: EngineConfig,
        done: mpsc::UnboundedSender<PushOutcome>,
    ) -> Result<Engine, EngineError> {
        let excludes = Excludes::new(&cfg.exclude)?;
        let fence = Arc::new(Fence::load(&cfg.state_dir)?);
        // Whichever role a restarted node takes, it lists and walks the
        // stores it knows first: read them ahead, several reads in flight.
        // (A first start's initial sync reads its files anyway, and warming
        // would take CPU from it.)
        let warm_roots: Vec<PathBuf> = cfg
            .stores
            .iter()
            .filter(|s| {
                Index::exists(&cfg.state_dir, &s.name)
                    || Index::exists(&cfg.state_dir, &format!("{}-replica", s.name))
            })
            .flat_map(|s| [s.root.clone(), s.replica_root.clone()])
            .collect();
        let warming =
            super::warm::Warming::start(&warm_roots, excludes.clone(), super::warm::WARM_THREADS);
        let sending = Arc::new(Sending::default());
        let store_roots: Vec<PathBuf> = cfg.stores.iter().map(|s| s.root.clone()).collect();
        let listener = crate::io::bind_listener(cfg.sync_listen, Duration::from_secs(10)).map_err(
            |source| EngineError::Listen {
                addr: cfg.sync_listen,
                source,
            },
        )?;
        let (mode_tx, mode_rx) = watch::channel(EngineMode::Idle);
        let stats = Arc::new(ReplStats::default());
        *stats.unverified.lock().expect("unverified lock") =
            super::receiver::unverified(&cfg.state_dir);
        let had_replica = cfg
            .stores
            .iter()
            .all(|s| Index::exists(&cfg.state_dir, &format!("{}-replica", s.name)));
        let held = held_at_start(&cfg)?;
        stats.set_replica_fill(super::fill::holds(
            &cfg.state_dir,
            super::takeover::is_former_primary(&cfg.state_dir),
            had_replica,
        ));
        // One durable-commit thread for the node's life (see
        // `DurableWorker`): the receiver's flushes, the ingester's commits.
        let durable = crate::io::DurableWorker::start_with(
            "hasync-durable",
            Some(super::receiver::orphan_hook(
                cfg.state_dir.clone(),
                stats.clone(),
            )),
        )
        .map_err(EngineError::Thread)?;
        let notifier = Arc::new(Mutex::new(None));
        let resync = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(QueueState::default());
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (promote_tx, promote_rx) = mpsc::unbounded_channel();
        let drain: Arc<Mutex<Option<DrainRequest>>> = Default::default();
        let primary_gen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let floor = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (prepared_tx, prepared_rx) = watch::channel(0u64);
        // Bounded: an application that commits faster than the pair can
        // confirm gets back-pressure (and then local-only outcomes).
        let (commit_tx, commit_rx) = crossbeam_channel::bounded(8_192);
        let commit_wake = Arc::new(tokio::sync::Notify::new());
        let state_dir = cfg.state_dir.clone();
        let shared = Shared {
            durable,
            fence: fence.clone(),
            sending: sending.clone(),
            commit_rx,
            commit_wake: commit_wake.clone(),
            queue: queue.clone(),
            push_done: done,
            cfg,
            excludes,
            stats: stats.clone(),
            notifier: notifier.clone(),
            resync: resync.clone(),
            drain: drain.clone(),
            primary_gen: primary_gen.clone(),
            served: served.clone(),
            floor: floor.clone(),
            prepared_tx,
        };
        let thread = std::thread::Builder::new()
            .name("hasync-repl".into())
            .spawn(move || {
                tokio_uring::start(engine_main(
                    shared, listener, mode_rx, push_rx, promote_rx, held,
                ))
            })
            .map_err(EngineError::Thread)?;
        Ok(Engine {
            fence,
            sending,
            commit_tx,
            commit_wake,
            store_roots,
            state_dir,
            mode_tx,
            push_tx,
            promote_tx,
            drain,
            primary_gen,
            served,
            floor,
            prepared_rx,
            queue,
            stats,
            notifier,
            resync,
            thread: Some(thread),
            _warming: warming,
        })
    }

    /// The promotion about to be set ([`Engine::set_mode`] to `Primary`)
    /// was taken knowing that the peer had served at epochs up to `floor`
    /// (its own epochs this node had heard of; 0: none): the takeover record
    /// keeps it, and a former primary that last served at or below it did
    /// so before this tenure began.
    pub fn promoting_from(&self, floor: u64) {
        self.floor.store(floor, Relaxed);
    }

    /// Sets the role the engine acts in, at `epoch` (a primary's or a
    /// secondary's epoch is known to be real: it is taken into the fence).
    /// Returns the primary tenure this
    /// mode belongs to (a new one each time the mode becomes `Primary`).
    ///
    /// Leaving `Primary`, it returns only once every sync session this
    /// node sent is cut (or after [`DEMOTION_CUT_WAIT`], logged): the caller
    /// announces the demotion after this, so the peer never hears it while
    /// this node still streams as primary.
    pub fn set_mode(&self, mode: EngineMode, epoch: u64) -> u64 {
        let current = *self.mode_tx.borrow();
        if mode == EngineMode::Primary && current != EngineMode::Primary {
            self.primary_gen.fetch_add(1, Relaxed);
        }
        if mode == EngineMode::Primary {
            // Before the engine acts as primary at this epoch.
            self.served.fetch_max(epoch, Relaxed);
        }
        if matches!(mode, EngineMode::Primary | EngineMode::Secondary) {
            self.fence.observe_durable(epoch);
        }
        self.mode_tx.send_if_modified(|m| {
            let changed = *m != mode;
            *m = mode;
            changed
        });
        if current == EngineMode::Primary && mode != EngineMode::Primary {
            let started = std::time::Instant::now();
            if !self.sending.wait_closed(DEMOTION_CUT_WAIT) {
                warn!(
                    "demoted, but a sync session sent as primary was not cut within {} ms",
                    DEMOTION_CUT_WAIT.as_millis()
                );
            } else {
                debug!(
                    us = started.elapsed().as_micros() as u64,
                    "demoted: sync sessions cut"
                );
            }
        }
        self.primary_gen.load(Relaxed)
    }

    /// The node's epoch record is durable at `epoch`: a primary's sessions
    /// carry it from now on, and sessions from below it are refused (see
    /// `fence`).
    pub fn observe_epoch(&self, epoch: u64) {
        self.fence.observe_durable(epoch);
    }

    /// The highest epoch this node knows of (its durable record, or one a
    /// session brought).
    pub fn fence_epoch(&self) -> u64 {
        self.fence.seen()
    }

    /// Resolves once primary tenure `gen` is prepared (IMAP UIDs raised,
    /// takeover record written); `false` if the node left that tenure
    /// first, or the engine stopped.
    pub fn primary_prepared(&self, gen: u64) -> impl std::future::Future<Output = bool> {
        let mut rx = self.prepared_rx.clone();
        let tenure = self.primary_gen.clone();
        async move {
            loop {
                if *rx.borrow_and_update() >= gen {
                    return true;
                }
                if tenure.load(Relaxed) != gen {
                    return false;
                }
                let tick = tokio::time::sleep(Duration::from_millis(50));
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return false },
                    _ = tick => {}
                }
            }
        }
    }

    /// A switchover: resolves once every local change is durable on the
    /// peer (nothing pending, in flight or held, the tracker quiet).
    pub fn drain(&self) -> oneshot::Receiver<()> {
        self.drain_handle().request()
    }

    /// [`Engine::drain`], to call later from elsewhere.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle(self.drain.clone())
    }

    pub fn status(&self) -> ReplStatus {
        self.stats.snapshot()
    }

    /// What this node's stores hold (one atomic read: the daemon asks
    /// before every event of its loop).
    pub fn replica_fill(&self) -> crate::failover::ReplicaFill {
        self.stats.replica_fill()
    }

    /// The operator accepts this node's incomplete replica as complete
    /// (`hasync accept-replica`): the returned job marks it durably (it
    /// writes to the disk: run it off the daemon's loop), then the status
    /// says it is complete and it may take over.
    pub fn replica_acceptor(&self) -> impl FnOnce() -> std::io::Result<()> + Send + 'static {
        let (dir, stats) = (self.state_dir.clone(), self.stats.clone());
        move || {
            super::fill::complete(&dir)?;
            stats.set_replica_fill(crate::failover::ReplicaFill::Complete);
            Ok(())
        }
    }

    /// Alarms the replication raised since the last call (already logged).
    pub fn take_alarms(&self) -> Vec<String> {
        self.stats.take_alarms()
    }

    /// Embedding API: the application wrote `path` inside a mailstore; send
    /// it without waiting for inotify.
    pub fn notify(&self, path: &Path) -> Result<(), EngineError> {
        let n = self.notifier.lock().expect("notifier lock").clone();
        match n {
            Some(n) => Ok(n.notify(path)?),
            None => Err(EngineError::NotPrimary),
        }
    }

    /// Pushes the local queue to the primary peer of tenure `epoch` (this
    /// node must be secondary). The outcome arrives on the `done` channel.
    pub fn push_queue(&self, epoch: u64) {
        let _ = self.push_tx.send(epoch);
    }

    /// Zero-loss commit: resolves once `path` (inside a replicated store) is
    /// durable on the peer as well, or after `timeout` as local-only. Many
    /// concurrent commits share one round trip (group commit).
    pub fn commit(
        &self,
        path: &Path,
        timeout: Duration,
    ) -> tokio::sync::oneshot::Receiver<CommitOutcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let local_only = |tx: tokio::sync::oneshot::Sender<CommitOutcome>, reason: String| {
            let _ = tx.send(CommitOutcome::LocalOnly { reason });
        };
        if *self.mode_tx.borrow() != EngineMode::Primary {
            local_only(
                tx,
                "this node is not primary: nothing to replicate to".into(),
            );
            return rx;
        }
        let found = self
            .store_roots
            .iter()
            .enumerate()
            .filter_map(|(i, root)| {
                path.strip_prefix(root)
                    .ok()
                    .map(|rel| (i, root, rel.to_path_buf()))
            })
            .max_by_key(|(_, root, _)| root.as_os_str().len());
        let Some((store, _, rel)) = found.filter(|(_, _, rel)| !rel.as_os_str().is_empty()) else {
            local_only(
                tx,
                format!("{} is not inside a replicated store", path.display()),
            );
            return rx;
        };
        let now = std::time::Instant::now();
        let req = CommitReq {
            store,
            rel,
            at: now,
            deadline: now + timeout,
            reply: tx,
        };
        match self.commit_tx.try_send(req) {
            Ok(()) => self.commit_wake.notify_one(),
            Err(e) => local_only(e.into_inner().reply, "too many commits waiting".into()),
        }
        rx
    }

    /// On promotion with queue replication on: moves the replicated queue
    /// into the live queue through the dedup ledger; resolves once done
    /// (its post-ingest hook included).
    pub fn promote_queue_replica(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.promote_tx.send(tx);
        rx
    }

    /// Forces a full verification (every file re-hashed on both sides) at the
    /// next opportunity.
    pub fn request_resync(&self) {
        self.resync.store(true, Relaxed);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.set_mode(EngineMode::Idle, 0);
        // Dropping the sender ends the engine thread's loop.
        let (tx, _) = watch::channel(EngineMode::Idle);
        drop(std::mem::replace(&mut self.mode_tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a demotion waits for the sync sessions it sent to be cut (on
/// the daemon's thread, which also sends heartbeats: well below a
/// heartbeat interval; a session that does not stop in time is still
/// refused by a replica that knows the newer epoch).
pub const DEMOTION_CUT_WAIT: Duration = Duration::from_millis(100);

/// Counts the sync sessions open as primary; a demotion waits for none.
#[derive(Default)]
struct Sending {
    open: Mutex<u32>,
    closed: std::sync::Condvar,
}

impl Sending {
    fn opened(self: &Arc<Self>) -> SendingGuard {
        *self.open.lock().expect("sending lock") += 1;
        SendingGuard(self.clone())
    }

    /// Whether none is open, waiting up to `wait`.
    fn wait_closed(&self, wait: Duration) -> bool {
        let open = self.open.lock().expect("sending lock");
        let (open, _) = self
            .closed
            .wait_timeout_while(open, wait, |n| *n > 0)
            .expect("sending lock");
        *open == 0
    }
}

/// One open session; dropped once its socket is shut down.
struct SendingGuard(Arc<Sending>);

impl Drop for SendingGuard {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().expect("sending lock");
        *open -= 1;
        if *open == 0 {
            self.0.closed.notify_all();
        }
    }
}

struct Shared {
    durable: crate::io::DurableWorker,
    fence: Arc<Fence>,
    sending: Arc<Sending>,
    commit_rx: crossbeam_channel::Receiver<CommitReq>,
    commit_wake: Arc<tokio::sync::Notify>,
    queue: Arc<QueueState>,
    push_done: mpsc::UnboundedSender<PushOutcome>,
    cfg: EngineConfig,
    excludes: Excludes,
    stats: Arc<ReplStats>,
    notifier: Arc<Mutex<Option<Notifier>>>,
    resync: Arc<AtomicBool>,
    drain: Arc<Mutex<Option<DrainRequest>>>,
    primary_gen: Arc<std::sync::atomic::AtomicU64>,
    /// See [`Engine`]'s fields of the same names.
    served: Arc<std::sync::atomic::AtomicU64>,
    floor: Arc<std::sync::atomic::AtomicU64>,
    prepared_tx: watch::Sender<u64>,
}

fn link_ctx(cfg: &EngineConfig) -> LinkCtx {
    LinkCtx {
        node_name: cfg.node_name.clone(),
        peer_name: cfg.peer_name.clone(),
        peer_addr: cfg.sync_peer,
        key: cfg.key.clone(),
        io_timeout: cfg.io_timeout,
        stats: LinkStats::default(),
        redial: tokio::sync::Notify::new(),
    }
}

async fn engine_main(
    shared: Shared,
    listener: std::net::TcpListener,
    mut mode_rx: watch::Receiver<EngineMode>,
    mut push_rx: mpsc::UnboundedReceiver<u64>,
    promote_rx: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    held: super::apply::HeldForRename,
) {
    let shared = Rc::new(shared);
    let ctx = Rc::new(link_ctx(&shared.cfg));
    let promote_rx = Rc::new(RefCell::new(Some(promote_rx)));
    {
        let (shared, ctx, mode_rx) = (shared.clone(), ctx.clone(), mode_rx.clone());
        tokio_uring::spawn(async move {
            while let Some(mut epoch) = push_rx.recv().await {
                // Requests that arrive during a push are served by it.
                while let Ok(e) = push_rx.try_recv() {
                    epoch = epoch.max(e);
                }
                let res = run_push(&shared, &ctx, &mode_rx, epoch).await;
                let _ = shared.push_done.send(res);
            }
        });
    }
    // The receiver's stores (and their indexes) live across connections.
    let recv_stores = Rc::new(RecvStores::default());
    let receiving = Rc::new(Receiving::default());
    *receiving.held_for_rename.borrow_mut() = held;
    tokio_uring::spawn(accept_loop(
        shared.clone(),
        ctx.clone(),
        tokio_uring::net::TcpListener::from_std(listener),
        mode_rx.clone(),
        recv_stores.clone(),
        receiving.clone(),
        promote_rx.borrow_mut().take().expect("taken once"),
    ));
    // One batch of foreign writes waits at most; the watch's thread grows
    // the next (bounded) meanwhile.
    let (foreign_tx, foreign_rx) = mpsc::channel(1);
    tokio_uring::spawn(foreign_loop(
        shared.clone(),
        foreign_rx,
        receiving.clone(),
        recv_stores.clone(),
        mode_rx.clone(),
    ));
    loop {
        let mode = *mode_rx.borrow_and_update();
        *shared.stats.mode.lock().expect("mode lock") = match mode {
            EngineMode::Idle => "idle",
            EngineMode::Primary => "sending",
            EngineMode::Secondary => "receiving",
        };
        if mode == EngineMode::Primary {
            // A scan taken as a secondary serves no session now, nor do
            // the sources held for renames onto protected paths (this
            // node's tree is the primary's now).
            receiving.void_prescan();
            drop_held_for_rename(&shared, &receiving);
            receiving.waiting_for_room.take();
            receiving.primary_running.set(true);
            run_primary(&shared, &ctx, &mut mode_rx).await;
            receiving.primary_running.set(false);
            receiving.primary_done.notify_waiters();
        } else {
            let watch = (mode == EngineMode::Secondary && shared.cfg.watch_foreign_writes)
                .then(|| start_foreign_watch(&shared, &foreign_tx))
                .flatten();
            // Only with the foreign-write watch on: it discards the scan
            // when anything else writes into the replica before the session.
            if mode == EngineMode::Secondary && watch.is_some() {
                prescan_replica(&shared, &recv_stores, &receiving);
            } else {
                receiving.void_prescan();
            }
            let changed = mode_rx.changed().await;
            drop(watch);
            *shared
                .stats
                .foreign_watch
                .lock()
                .expect("foreign watch lock") = "-".into();
            if changed.is_err() {
                finish_receiving(&receiving, &recv_stores).await;
                return;
            }
        }
    }
}

/// The engine is stopping (the daemon shuts down): the receiving session
/// ends on the mode change and saves its index; wait for it (bounded), and
/// save the indexes of the stores between sessions, so that a restarted
/// secondary does not re-read and re-hash its whole store.
async fn finish_receiving(receiving: &Rc<Receiving>, stores: &Rc<RecvStores>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // A scan of the replica in progress has the indexes: they come back
    // with it.
    if tokio::time::timeout_at(deadline, stores.returned())
        .await
        .is_err()
    {
        warn!("the replica's scan did not end within 10 s of shutdown: its index is not saved");
        return;
    }
    while receiving.busy.get() {
        let released = receiving.released.notified();
        if let Some(c) = receiving.closer.borrow_mut().take() {
            let _ = c.shutdown();
        }
        if tokio::time::timeout_at(deadline, released).await.is_err() {
            warn!(
                "the receiving session did not end within 10 s of shutdown: its index is not saved"
            );
            return;
        }
    }
    if let Some(st) = stores.slot.borrow_mut().as_mut() {
        for s in st.iter_mut() {
            if let Err(e) = s.index.save() {
                warn!(store = %s.name, "cannot save index at shutdown: {e}");
            }
        }
    }
}

/// The node became secondary: scan the replica now (its index makes this
/// cheap for what did not change), so that the primary's first manifest
/// request is answered at once instead of after a walk of its own; the two
/// nodes' walks overlap. Nothing else changes the replica before the first
/// session but foreign writes, which discard the scans (so it runs only
/// while the foreign-write watch is on).
///
/// The walk reads and hashes what changed while the node was down, seconds
/// for a large store: it runs on a thread of its own (`hasync-prescan`),
/// with the stores and their indexes lent to it, so that this loop goes on
/// accepting and authenticating connections meanwhile. A session that comes
/// during it waits for the stores and takes the scan with them.
fn prescan_replica(shared: &Shared, stores: &Rc<RecvStores>, receiving: &Rc<Receiving>) {
    if receiving.busy.get() || stores.lent.get() {
        return;
    }
    let st = match stores.take_now(&shared.cfg) {
        Ok(s) => s,
        // The session reports it when it opens them.
        Err(_) => return,
    };
    let voids = receiving.prescan_voids.get();
    stores.lent.set(true);
    let (stores, receiving) = (stores.clone(), receiving.clone());
    let excludes = shared.excludes.clone();
    tokio_uring::spawn(async move {
        let scanned = off_loop("hasync-prescan", st, move |st| scan_replica(st, &excludes)).await;
        let Some((st, scans)) = scanned else {
            // The thread panicked with the indexes: the next session opens
            // the stores again from their saved indexes.
            warn!("the replica's scan failed (its thread panicked): the first manifest walks the replica");
            stores.give_back(None);
            return;
        };
        // Fresh from the walk's end: anything written into the replica
        // since it began, by another process (the foreign watch), or a
        // role change, voided it meanwhile; this node lands nothing while
        // the stores are lent.
        if receiving.prescan_voids.get() != voids {
            debug!("the replica changed during its scan: the scan is dropped");
            stores.give_back(Some(st));
            return;
        }
        let at = std::time::Instant::now();
        *receiving.prescan.borrow_mut() = Some(super::receiver::Prescan { at, scans });
        stores.give_back(Some(st));
        // A scan no session took while it was fresh is of no use: its
        // memory is given back.
        tokio::time::sleep(super::receiver::PRESCAN_FRESH).await;
        let mut kept = receiving.prescan.borrow_mut();
        if kept.as_ref().is_some_and(|p| p.at == at) {
            kept.take();
            debug!("the replica's scan was not taken while fresh: dropped");
        }
    });
}

/// Walks each store of the replica through its index (the prescan's
/// thread): hashes what changed while this node was down (the costly part)
/// and keeps the entries of the stores that fit the budget; a store beyond
/// it is walked again for the manifest, its hashes in the index by then.
fn scan_replica(
    st: &mut [RecvStore],
    excludes: &super::Excludes,
) -> Vec<Option<super::index::Scan>> {
    let started = std::time::Instant::now();
    // A test stands in for the walk of a large store with a pause here.
    let slow = crate::failpoint::wait_or("PRESCAN", Duration::ZERO);
    if !slow.is_zero() {
        std::thread::sleep(slow);
    }
    let mut left = super::walk::HELD_BYTES_MAX;
    let scans = st
        .iter_mut()
        .map(|s| {
            let scan = super::walk::Walk::new(&mut s.index, super::index::Rehash::Changed, true)
                .run(s.root.tree(), &mut s.index, excludes, left, |_| {})
                .ok()
                .flatten();
            left = left.saturating_sub(scan.as_ref().map_or(0, |s| s.entries.held_bytes()));
            scan
        })
        .collect();
    debug!(
        ms = started.elapsed().as_millis() as u64,
        "replica scanned for the first manifest"
    );
    scans
}

/// Whether the file at `rel` is still the version this node landed (size,
/// mtime and inode as in the index; the ctime moves with the landing's
/// rename, so it is not compared).
fn landed_unchanged(rs: &RecvStore, rel: &Path) -> bool {
    let Some(e) = rs.index.get(rel) else {
        return false;
    };
    let Ok(m) = std::fs::symlink_metadata(rs.root.path().join(rel)) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    m.is_file()
        && e.version.size == m.len()
        && e.version.mtime_s == m.mtime()
        && i64::from(e.version.mtime_ns) == m.mtime_nsec()
        && e.version.ino == m.ino()
}

/// While secondary: watch the replica roots for writes by other processes.
fn start_foreign_watch(
    shared: &Shared,
    tx: &mpsc::Sender<super::foreign::Batch>,
) -> Option<super::foreign::ForeignWatch> {
    use super::foreign::{ForeignWatch, WatchedRoot};
    let roots: Vec<WatchedRoot> = shared
        .cfg
        .stores
        .iter()
        .map(|s| WatchedRoot {
            root: s.replica_root.clone(),
            internal: s.internal.clone(),
        })
        .collect();
    let started = roots
        .iter()
        .try_for_each(|r| std::fs::create_dir_all(&r.root))
        .and_then(|()| ForeignWatch::start(roots, shared.excludes.clone(), tx.clone()));
    let state = &shared.stats.foreign_watch;
    match started {
        Ok(w) => {
            *state.lock().expect("foreign watch lock") = "on".into();
            Some(w)
        }
        Err(e) => {
            let why =
                format!("cannot watch the replica for foreign writes (fanotify needs root): {e}");
            warn!("{why}");
            *state.lock().expect("foreign watch lock") = format!("off: {e}");
            None
        }
    }
}

/// Acts on writes into the replica by other processes: ends the session in
/// progress (the primary's next one reconciles the replica with its tree),
/// keeps every foreign file aside as a conflict, alarms.
async fn foreign_loop(
    shared: Rc<Shared>,
    mut rx: mpsc::Receiver<super::foreign::Batch>,
    receiving: Rc<Receiving>,
    stores: Rc<RecvStores>,
    mode_rx: watch::Receiver<EngineMode>,
) {
    use super::foreign;
    // A stray writer that keeps writing must not keep the replica from
    // catching up: sessions end for foreign writes at most this often.
    const SESSION_END_EVERY: Duration = Duration::from_secs(10);
    let mut last_end: Option<tokio::time::Instant> = None;
    while let Some(mut batch) = rx.recv().await {
        if *mode_rx.borrow() != EngineMode::Secondary {
            continue; // changes made as the node's role changed are its own
        }
        // A scan taken before this write (or under way) no longer
        // describes the replica.
        receiving.void_prescan();
        if batch.paths.is_empty() {
            // Only a kernel queue overflow (hasync's own landings during an
            // initial sync can cause it): nothing to keep aside; whatever a
            // stranger wrote meanwhile is found by the next verification.
            warn!(
                "the fanotify event queue overflowed: foreign writes during it cannot be told from hasync's own ({} unlisted)",
                batch.unlisted
            );
            continue;
        }
        if let Some(t) = last_end {
            tokio::time::sleep_until(t + SESSION_END_EVERY).await;
        }
        // Whatever arrived meanwhile is handled with it.
        while let Ok(more) = rx.try_recv() {
            batch.paths.extend(more.paths);
            batch.unlisted += more.unlisted;
            batch.overflow |= more.overflow;
        }
        if *mode_rx.borrow() != EngineMode::Secondary {
            continue;
        }
        last_end = Some(tokio::time::Instant::now());
        // Neither a session nor a scan of the replica may have the stores.
        loop {
            if receiving.busy.get() {
                let released = receiving.released.notified();
                if let Some(c) = receiving.closer.borrow_mut().take() {
                    info!("ending the sync session: the replica was changed outside hasync");
                    let _ = c.shutdown();
                }
                released.await;
            } else if stores.lent.get() {
                stores.returned().await;
            } else {
                break;
            }
        }
        if *mode_rx.borrow() != EngineMode::Secondary {
            continue;
        }
        // No await from here on: no session can start meanwhile.
        receiving.void_prescan();
        let mut st = match stores.take_now(&shared.cfg) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                        "the replica was changed outside hasync ({} paths) and cannot be opened to keep them aside: {e}",
                        batch.paths.len()
                    );
                error!(alarm = true, "ALARM: {msg}");
                shared.stats.raise_alarm(msg);
                continue;
            }
        };
        let mut kept: Vec<(usize, PathBuf)> = Vec::new();
        for p in batch.paths.iter().filter(|p| p.holds_foreign_data()) {
            if foreign::inside_kept(&kept, p.store, &p.rel) {
                continue;
            }
            let dovecot = matches!(
                shared.cfg.stores.get(p.store).and_then(|s| s.kind.as_ref()),
                Some(crate::config::StoreKind::DovecotMaildir { .. })
            );
            if dovecot && !p.is_dir && super::dovecot::is_dovecot_metadata(&p.rel) {
                // A Dovecot running here wrote its own index or uidlist:
                // not mail; the primary's version comes back.
                continue;
            }
            let Some(rs) = st.get_mut(p.store) else {
                continue;
            };
            if p.only_closed_after_write() && landed_unchanged(rs, &p.rel) {
                // Opened for writing and closed, but not written (same
                // size, mtime and inode as landed): nothing to keep aside.
                continue;
            }
            match rs.root.keep_aside(&p.rel) {
                Ok(Some(to)) => {
                    info!(store = %rs.name, path = %p.rel.display(), kept = %to.display(), by = %p.by, "foreign write kept aside");
                    rs.index.remove_tree(&p.rel);
                    kept.push((p.store, p.rel.clone()));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(store = %rs.name, path = %p.rel.display(), "cannot keep a foreign write aside: {e}")
                }
            }
        }
        for p in &batch.paths {
            if let Some(rs) = st.get_mut(p.store) {
                rs.index.unsync_tree(&p.rel);
            }
        }
        let names: Vec<String> = st.iter().map(|s| s.name.clone()).collect();
        stores.put(st);
        shared
            .stats
            .foreign_writes
            .fetch_add(batch.paths.len() as u64 + batch.unlisted, Relaxed);
        shared
            .stats
            .conflicts_kept
            .fetch_add(kept.len() as u64, Relaxed);
        let msg = foreign::describe(&names, &batch, kept.len());
        error!(alarm = true, "ALARM: {msg}");
        shared.stats.raise_alarm(msg);
    }
}

/// Acts as primary until the mode changes: tracker on, sessions to the peer.
async fn run_primary(
    shared: &Rc<Shared>,
    ctx: &Rc<LinkCtx>,
    mode_rx: &mut watch::Receiver<EngineMode>,
) {
    let cfg = &shared.cfg;
    let roots: Vec<PathBuf> = cfg.stores.iter().map(|s| s.root.clone()).collect();
    let started = std::time::Instant::now();
    // Returns once the roots are watched; the folders below are watched
    // on the tracker's thread while the takeover walk goes, each before
    // the walk reads it (see `Tree::read_folders_after`).
    let (tracker, coalescer, watching) = match Tracker::start_watching(TrackerConfig {
        roots: roots.clone(),
        exclude: cfg.exclude.clone(),
    }) {
        Ok(t) => t,
        Err(e) => {
            warn!("cannot start the change tracker: {e}; retrying");
            *shared.stats.last_error.lock().expect("error lock") = Some(e.to_string());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = mode_rx.changed() => {}
            }
            return;
        }
    };
    debug!(
        ms = started.elapsed().as_millis() as u64,
        "primary: tracker watching the roots"
    );
    *shared.notifier.lock().expect("notifier lock") = Some(tracker.notifier());
    // A refusal of what this node handed over as a secondary is no longer
    // its status.
    *shared
        .stats
        .conflict_refused
        .lock()
        .expect("conflict refused lock") = None;
    // Shared with the status relay of each session; the inotify thread stops
    // when the last reference is dropped.
    let tracker = Rc::new(tracker);
    let mut stores = Vec::with_capacity(cfg.stores.len());
    for (i, s) in cfg.stores.iter().enumerate() {
        match super::tree::Tree::open(&s.root) {
            Ok(mut tree) => stores.push(Store {
                tree: {
                    let watching = watching.clone();
                    tree.read_folders_after(Arc::new(move |rel| watching.wait_for(i, rel)));
                    tree
                },
                name: s.name.clone(),
                root: s.root.clone(),
                index: Index::load(&cfg.state_dir, &s.name),
                internal: s.internal.clone(),
                conflicts: s.replica_root == s.root && s.period.is_none(),
                dovecot: s.kind.is_some(),
            }),
            Err(e) => {
                warn!(
                    "cannot open mailstore {} ({}): {e}; retrying",
                    s.name,
                    s.root.display()
                );
                *shared.stats.last_error.lock().expect("error lock") = Some(e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = mode_rx.changed() => {}
                }
                *shared.notifier.lock().expect("notifier lock") = None;
                return;
            }
        }
    }
    debug!(
        ms = started.elapsed().as_millis() as u64,
        "primary: indexes loaded"
    );
    let tenure = shared.primary_gen.load(Relaxed);
    raise_imap_uids(cfg, &shared.stats);
    // The tracker runs already: what changes after these scans is queued.
    let scanned_at = std::time::Instant::now();
    let epoch = shared.served.load(Relaxed);
    let floor = shared.floor.load(Relaxed);
    crate::failpoint::hit("engine.before_takeover_record");
    let Some((stores, scans, record_complete)) =
        record_takeover_off_loop(cfg, &shared.excludes, stores, (epoch, floor)).await
    else {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = mode_rx.changed() => {}
        }
        *shared.notifier.lock().expect("notifier lock") = None;
        return;
    };
    // Every folder watched before a session starts: a comparison's walk
    // (of a store the takeover walk did not read) waits for the folders it
    // reads to be watched, and must not wait on this loop. The takeover
    // walk, gated the same way, mostly ends with the watching.
    if !watching.is_done() {
        let _ = off_loop("hasync-watching", watching.clone(), |w| w.wait_done()).await;
    }
    // Fresh from the walk's end (what changed since it began is queued):
    // a million-entry walk takes longer than the freshness.
    let held_at = std::time::Instant::now();
    if !mark_serving(shared, mode_rx, (tenure, epoch)).await {
        *shared.notifier.lock().expect("notifier lock") = None;
        return;
    }
    shared.prepared_tx.send_replace(tenure);
    let mut sender = Sender::new(
        stores,
        shared.excludes.clone(),
        coalescer,
        shared.stats.clone(),
        cfg.verify_interval,
    );
    sender.state_dir = cfg.state_dir.clone();
    sender.tenure = (epoch, floor);
    sender.prescanned = Some((held_at, scans));
    sender.takeover_settled = record_complete;
    sender.resync_requested = shared.resync.clone();
    sender.commits = Some(shared.commit_rx.clone());
    sender.commit_wake = Some(shared.commit_wake.clone());
    sender.gate = super::gate::PeriodicGate::new(cfg.stores.iter().map(|s| s.period).collect());
    sender.zero_copy = cfg.zero_copy;
    sender.drain = shared.drain.clone();
    info!(
        stores = cfg.stores.len(),
        watches = tracker.stats().watches,
        "replication: tracking mailstores as primary"
    );
    // The peer refuses until it has become secondary itself, which happens
    // within a heartbeat or two: keep the ceiling low so the sync starts soon.
    let mut backoff = Backoff::with_max(Duration::from_millis(250));
    let mut last_err = String::new();
    loop {
        if *mode_rx.borrow() != EngineMode::Primary {
            break;
        }
        *shared.stats.tracker.lock().expect("tracker stats lock") = tracker.stats();
        match session(ctx, &mut sender, mode_rx, &tracker, shared).await {
            Ok(()) => break,
            Err(SendError::Stopped) => break,
            Err(e) => {
                shared.stats.connected.store(false, Relaxed);
                let msg = e.to_string();
                if msg != last_err {
                    info!("sync session to peer ended: {msg}");
                    last_err = msg;
                } else {
                    debug!("sync session to peer ended: {msg}");
                }
            }
        }
        // The peer has not said what it is for a while: it may be a former
        // primary that comes back later, after this node's users changed
        // what it held at takeover.
        if scanned_at.elapsed() >= PEER_STATE_WAIT {
            sender.settle_takeover_record();
        }
        // The takeover walk's entries serve only a first comparison that
        // comes while they are fresh: with the peer away, their memory is
        // given back.
        sender.drop_stale_prescan();
        // Keep the tracker's pending list bounded while disconnected, and
        // let commits waiting for a peer that is gone degrade on time.
        sender.coalescer.drain();
        sender.forget_inflight_commits();
        sender.expire_commits();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = mode_rx.changed() => {}
        }
    }
    shared.stats.connected.store(false, Relaxed);
    *shared.notifier.lock().expect("notifier lock") = None;
    sender.save_indexes();
    match Rc::try_unwrap(tracker) {
        Ok(t) => t.stop(),
        Err(rc) => drop(rc),
    }
    info!("replication: stopped tracking (no longer primary)");
}

/// Asks the sender for a drain (see [`Engine::drain`]).
#[derive(Clone)]
pub struct DrainHandle(Arc<Mutex<Option<DrainRequest>>>);

impl DrainHandle {
    pub fn request(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *self.0.lock().expect("drain lock") = Some(DrainRequest { reply: tx });
        rx
    }
}

/// Sends on its oneshot when dropped (a promotion answered on every path).
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Runs `job` on `input` on a thread named `name`, and gives both back
/// once it is done: disk work of seconds (a walk of a large store, a queue
/// promotion) off this loop, which goes on serving connections meanwhile.
/// `None` if the thread panicked (the input went with it). Should no
/// thread start, it runs here.
async fn off_loop<T, R>(
    name: &str,
    input: T,
    job: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Option<(T, R)>
where
    T: Send + 'static,
    R: Send + 'static,
{
    // Held here until the thread takes it, so that a thread that does not
    // start leaves both to run on this loop.
    let slot = Arc::new(Mutex::new(Some((input, job))));
    let (tx, rx) = oneshot::channel();
    let taken = slot.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let (mut input, job) = taken.lock().expect("off-loop slot").take().expect("once");
            let out = job(&mut input);
            let _ = tx.send((input, out));
        });
    match spawned {
        Ok(_) => rx.await.ok(),
        Err(e) => {
            warn!("cannot start the thread {name} ({e}): its work runs on the replication loop");
            let (mut input, job) = slot
                .lock()
                .expect("off-loop slot")
                .take()
                .expect("not taken");
            let out = job(&mut input);
            Some((input, out))
        }
    }
}

/// Moves the queue replica at `replica` into the live queue
/// (`Ingester::ingest_local`) on a thread of its own ([`off_loop`]), and
/// gives the ingester back with the outcome: `None` if the thread panicked
/// (the ledger is closed with it; pushes to this node are refused until a
/// restart).
async fn promote_off_loop(
    ing: Ingester,
    replica: PathBuf,
) -> (Option<Ingester>, Result<(u64, u64), String>) {
    match off_loop("hasync-promote", ing, move |ing| {
        ing.ingest_local(&replica).map_err(|e| e.to_string())
    })
    .await
    {
        Some((ing, outcome)) => (Some(ing), outcome),
        None => (
            None,
            Err("the promotion thread panicked; queue pushes to this node are refused until it restarts".into()),
        ),
    }
}

/// How long a promotion of the queue replica that failed waits before it
/// is tried again.
const PROMOTE_RETRY: Duration = Duration::from_secs(5);

/// This node starts serving as primary: in every Dovecot Maildir store,
/// each mailbox's next IMAP UID is raised past what the old primary may
/// have handed out in its lag window (see `dovecot`).
fn raise_imap_uids(cfg: &EngineConfig, stats: &ReplStats) {
    for s in &cfg.stores {
        let Some(crate::config::StoreKind::DovecotMaildir { uid_margin }) = s.kind else {
            continue;
        };
        let started = std::time::Instant::now();
        let r = super::dovecot::raise_next_uids(&s.root, uid_margin);
        info!(
            store = %s.name,
            mailboxes = r.raised,
            margin = uid_margin,
            ms = started.elapsed().as_millis() as u64,
            "IMAP next UIDs raised by {uid_margin} in {} mailboxes",
            r.raised
        );
        if let Some(first) = r.failed.first() {
            let line = format!(
                "cannot raise the next IMAP UID of {} mailboxes in {} (a UID the old primary handed out may be given again there); first: {first}",
                r.failed.len(),
                s.name
            );
            error!(alarm = true, "ALARM: {line}");
            stats.raise_alarm(line);
        }
    }
}

/// How often a primary retries the former-primary mark it could not write.
const MARK_RETRY: Duration = Duration::from_secs(1);

/// Marks this node durably as serving primary at `epoch` before it serves:
/// the mark is what it tells a later primary about this tenure (that it
/// served, and at which epoch), so a tenure without it could have its
/// users' mail judged as never held. Retries (with an alarm) until the mark
/// is written; `false` if the node left this primary tenure first.
async fn mark_serving(
    shared: &Rc<Shared>,
    mode_rx: &mut watch::Receiver<EngineMode>,
    (tenure, epoch): (u64, u64),
) -> bool {
    let state_dir = &shared.cfg.state_dir;
    let mut alarmed = false;
    loop {
        match super::takeover::mark_former_primary(state_dir, epoch) {
            Ok(()) => {
                if alarmed {
                    info!(epoch, "former-primary mark written: serving as primary");
                }
                // What a primary serves is its store: complete from now on.
                match super::fill::complete(state_dir) {
                    Ok(()) => shared
                        .stats
                        .set_replica_fill(crate::failover::ReplicaFill::Complete),
                    Err(e) => warn!(
                        "cannot mark this node's replica complete as it serves: {e} (it counts as incomplete after a restart)"
                    ),
                }
                return true;
            }
            Err(e) if !alarmed => {
                let line = format!(
                    "cannot mark this node as serving primary in {}: {e}; not serving (no on_primary hook, no sync) until it is written, retrying every {} ms",
                    state_dir.display(),
                    MARK_RETRY.as_millis()
                );
                error!(alarm = true, "ALARM: {line}");
                *shared.stats.last_error.lock().expect("error lock") = Some(line.clone());
                shared.stats.raise_alarm(line);
                alarmed = true;
            }
            Err(e) => debug!("former-primary mark still not written: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(MARK_RETRY) => {}
            _ = mode_rx.changed() => {}
        }
        if *mode_rx.borrow() != EngineMode::Primary || shared.primary_gen.load(Relaxed) != tenure {
            return false;
        }
    }
}

/// How long a new primary waits for its peer to say whether it is a former
/// primary before it reads what its takeover record still lacks.
const PEER_STATE_WAIT: Duration = Duration::from_secs(10);

/// This node starts serving as primary: record what it holds now (per
/// mailstore, durably, before any change it sends; [`mark_serving`] then
/// marks it as a node that served as primary). A former primary that
/// rejoins later is checked against this record (see `takeover`). Reads no file: versions the index
/// knows give their hash, the others are recorded by inode, size and mtime
/// and read only if the peer may be a former primary (it says it is, or it
/// has not said otherwise within [`PEER_STATE_WAIT`]; see
/// [`Sender::settle_takeover_record`]).
/// Returns the scans it took (per store; `None` where it took none), for the
/// first comparison with the replica, and whether the record is complete.
fn record_takeover(
    cfg: &EngineConfig,
    excludes: &super::Excludes,
    stores: &mut [Store],
    (epoch, floor): (u64, u64),
) -> (Vec<Option<super::index::Scan>>, bool) {
    use super::index::Kind;
    let started = std::time::Instant::now();
    // A test stands in for the walk of a large store with a pause here.
    let slow = crate::failpoint::wait_or("TAKEOVER_WALK", Duration::ZERO);
    if !slow.is_zero() {
        std::thread::sleep(slow);
    }
    let (mut files, mut unread) = (0usize, 0usize);
    let mut scans: Vec<Option<super::index::Scan>> = stores.iter().map(|_| None).collect();
    // What is held for the first comparison, over all stores.
    let mut left = super::walk::HELD_BYTES_MAX;
    for (i, st) in stores.iter_mut().enumerate().filter(|(_, s)| s.conflicts) {
        // Sized once (growing a million-entry list holds it twice), sorted
        // and without repeats before it is written.
        let mut hashes: Vec<u128> = Vec::with_capacity(st.index.len_hint());
        let mut pending = Vec::new();
        let walk = super::walk::Walk::new(&mut st.index, super::index::Rehash::Changed, false);
        let held = walk.run(&st.tree, &mut st.index, excludes, left, |(_, s, h)| {
            if s.kind == Kind::File {
                match h {
                    Some(h) => hashes.push(*h),
                    None => pending.push(super::takeover::Pending::of(&s.version)),
                }
            }
        });
        match held {
            // Kept for the first comparison if it fits (else walked again).
            Ok(scan) => {
                left = left.saturating_sub(scan.as_ref().map_or(0, |s| s.entries.held_bytes()));
                scans[i] = scan
            }
            Err(e) => {
                error!(alarm = true, store = %st.name, "ALARM: cannot record what this node holds as it takes over ({e}); a former primary that rejoins will have every version this node lacks kept aside as a conflict");
                continue;
            }
        };
        // Restarted before the former primary was reconciled: what this
        // node held at its takeover and sent since still counts as held,
        // if that peer has not served as primary since.
        let carried = super::takeover::carried_over(&cfg.state_dir, &st.name);
        if let Some(c) = &carried {
            info!(store = %st.name, versions = c.hashes.len(), since_epoch = c.epoch, "takeover record of the earlier tenure carried over (its former primary is not reconciled yet)");
        }
        hashes.sort_unstable();
        hashes.dedup();
        files += hashes.len() + pending.len();
        unread += pending.len();
        if let Err(e) = super::takeover::write_sorted(
            &cfg.state_dir,
            &st.name,
            &hashes,
            &pending,
            (epoch, floor),
            carried.as_ref(),
        ) {
            error!(alarm = true, store = %st.name, "ALARM: cannot write the takeover record: {e}");
        }
    }
    info!(
        versions = files,
        unhashed = unread,
        ms = started.elapsed().as_millis() as u64,
        "takeover record written"
    );
    (scans, unread == 0)
}

/// [`record_takeover`] on a thread of its own (`hasync-takeover`, see
/// [`off_loop`]): a walk of every store, seconds for a large one, during
/// which this loop goes on serving connections (a former primary's queue
/// push among them). `None` if the thread panicked (the stores went with
/// it; the caller opens them again).
async fn record_takeover_off_loop(
    cfg: &EngineConfig,
    excludes: &super::Excludes,
    stores: Vec<Store>,
    tenure: (u64, u64),
) -> Option<(Vec<Store>, Vec<Option<super::index::Scan>>, bool)> {
    let (cfg, excludes) = (cfg.clone(), excludes.clone());
    let walked = off_loop("hasync-takeover", stores, move |stores| {
        record_takeover(&cfg, &excludes, stores, tenure)
    })
    .await;
    let Some((stores, (scans, complete))) = walked else {
        error!(
            alarm = true,
            "ALARM: the takeover record's walk failed (its thread panicked); the stores are opened again"
        );
        return None;
    };
    Some((stores, scans, complete))
}

async fn session(
    ctx: &Rc<LinkCtx>,
    sender: &mut Sender,
    mode_rx: &watch::Receiver<EngineMode>,
    tracker: &Rc<Tracker>,
    shared: &Rc<Shared>,
) -> Result<(), SendError> {
    let stream = connect_within(ctx).await?;
    // No progress for this long through a cut link: reconnect instead of
    // waiting out TCP's retransmission backoff.
    crate::io::set_user_timeout(&stream, ctx.io_timeout).map_err(|source| {
        crate::link::LinkError::Io {
            peer: ctx.peer_addr,
            op: "set TCP_USER_TIMEOUT",
            source,
        }
    })?;
    let mut conn = Conn::new(stream, ctx.peer_addr);
    handshake(&mut conn, ctx, Side::Initiator, Channel::Sync).await?;
    // Counted from here until the socket is shut down (a demotion waits).
    let _open = shared.sending.opened();
    if *mode_rx.borrow() != EngineMode::Primary {
        return Err(SendError::Stopped);
    }
    sender.epoch = shared.fence.seen();
    shared.stats.connected.store(true, Relaxed);
    info!(peer = %ctx.peer_addr, "sync connection to peer up");
    let (mut reader, writer) = conn.split();
    let (tx, mut rx) = mpsc::channel(4096);
    let reader_task = tokio_uring::spawn(async move {
        loop {
            let msg = match reader.recv_frame().await {
                Ok(f) => SyncMsg::decode(&f).map_err(|source| crate::link::LinkError::Wire {
                    peer: reader.peer(),
                    source,
                }),
                Err(e) => Err(e),
            };
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    // Stop when the role changes; refresh tracker stats meanwhile.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let mut mode_watch = mode_rx.clone();
    let stats = shared.stats.clone();
    let tracker = tracker.clone();
    let relay = tokio_uring::spawn(async move {
        loop {
            tokio::select! {
                r = mode_watch.changed() => {
                    if r.is_err() || *mode_watch.borrow() != EngineMode::Primary {
                        let _ = stop_tx.send(true);
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    *stats.tracker.lock().expect("tracker stats lock") = tracker.stats();
                }
            }
        }
    });
    let res = sender.run(&writer, &mut rx, &mut stop_rx).await;
    relay.abort();
    reader_task.abort();
    let _ = writer.shutdown();
    res
}

/// Accepts the primary's sync connection while this node is secondary.
async fn accept_loop(
    shared: Rc<Shared>,
    ctx: Rc<LinkCtx>,
    listener: tokio_uring::net::TcpListener,
    mode_rx: watch::Receiver<EngineMode>,
    stores: Rc<RecvStores>,
    receiving: Rc<Receiving>,
    mut promote_rx: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    // Opened at start so that an ingest a crash interrupted is rolled
    // forward at once, not at the next push.
    let q = &shared.cfg.queue;
    let opened =
        match crate::queue::ledger::Ledger::open(&q.ledger, q.ledger_max_entries, q.ledger_max_age)
            .map_err(crate::queue::push::PushError::from)
            .and_then(|ledger| {
                Ingester::open(
                    q.layout,
                    &q.queue_dir,
                    ledger,
                    q.hook.clone(),
                    &q.staging,
                    shared.durable.clone(),
                )
            }) {
            Ok(mut i) => {
                i.stats.ledger_entries = i.ledger_len() as u64;
                *shared.queue.ingest.lock().expect("ingest lock") = i.stats.clone();
                Some(i)
            }
            Err(e) => {
                error!(
                    "cannot open the queue ledger: {e}; queue pushes to this node will be refused"
                );
                *shared.queue.last_error.lock().expect("queue error lock") = Some(e.to_string());
                None
            }
        };
    let ingester: Rc<RefCell<Option<Ingester>>> = Rc::new(RefCell::new(opened));
    {
        // Promotion: the replicated queue joins the live queue. One that
        // fails is tried again while the node is primary: what it left in
        // the replica would otherwise wait for the next promotion.
        let (shared, ingester, mode_rx) = (shared.clone(), ingester.clone(), mode_rx.clone());
        tokio_uring::spawn(async move {
            // A failure episode alarms once.
            let (mut failed, mut alarmed) = (false, false);
            loop {
                let done = if failed {
                    tokio::select! {
                        d = promote_rx.recv() => match d {
                            Some(d) => Some(d),
                            None => return,
                        },
                        _ = tokio::time::sleep(PROMOTE_RETRY) => None,
                    }
                } else {
                    match promote_rx.recv().await {
                        Some(d) => Some(d),
                        None => return,
                    }
                };
                if done.is_none() && *mode_rx.borrow() != EngineMode::Primary {
                    (failed, alarmed) = (false, false);
                    continue;
                }
                // Answered when this iteration ends, whatever the outcome.
                let _done = DropSignal(done);
                let Some(replica) = shared
                    .cfg
                    .stores
                    .iter()
                    .find(|s| s.name == QUEUE_STORE)
                    .map(|s| s.replica_root.clone())
                else {
                    failed = false;
                    continue;
                };
                failed = true;
                let taken = ingester.borrow_mut().take();
                let Some(ing) = taken else {
                    if !alarmed {
                        warn!("cannot promote the queue replica: the ledger is busy or unavailable; tried again every {} s", PROMOTE_RETRY.as_secs());
                        alarmed = true;
                    }
                    continue;
                };
                // What lands in the live queue during this attempt, whatever
                // its outcome (a batch completed before a later one failed).
                let landed_before = ing.stats.ingested + ing.stats.rolled_forward;
                // Scanning both queues and moving every message is disk
                // work of seconds for a large queue: off this loop, which
                // serves the sync connections meanwhile.
                let (back, outcome) = promote_off_loop(ing, replica).await;
                let Some(mut ing) = back else {
                    let e = outcome.err().unwrap_or_default();
                    error!(
                        alarm = true,
                        "ALARM: promoting the queue replica failed: {e}"
                    );
                    *shared.queue.last_error.lock().expect("queue error lock") = Some(e);
                    failed = false;
                    continue;
                };
                let landed = ing.stats.ingested + ing.stats.rolled_forward - landed_before;
                // As after a push: the MTA must learn of them (`postsuper
                // -s`), before anything delivers them.
                if landed > 0 {
                    ing.run_hook("promotion", landed).await;
                }
                match outcome {
                    Ok((moved, dups)) => {
                        failed = false;
                        alarmed = false;
                        *shared.queue.last_error.lock().expect("queue error lock") = None;
                        info!(
                            moved,
                            duplicates = dups,
                            "queue replica promoted into the live queue: {moved} messages, {dups} already there"
                        );
                    }
                    Err(e) if alarmed => {
                        warn!("promoting the queue replica failed again: {e}");
                        *shared.queue.last_error.lock().expect("queue error lock") =
                            Some(e.to_string());
                    }
                    Err(e) => {
                        error!(
                            alarm = true,
                            "ALARM: promoting the queue replica failed: {e}; tried again every {} s while this node is primary",
                            PROMOTE_RETRY.as_secs()
                        );
                        alarmed = true;
                        *shared.queue.last_error.lock().expect("queue error lock") =
                            Some(e.to_string());
                    }
                }
                ing.stats.ledger_entries = ing.ledger_len() as u64;
                *shared.queue.ingest.lock().expect("ingest lock") = ing.stats.clone();
                *ingester.borrow_mut() = Some(ing);
            }
        });
    }
    let gate = Rc::new(Gate::new(
        "sync",
        Limits::default(),
        Some(shared.cfg.sync_peer.ip()),
        shared.stats.gate.clone(),
    ));
    tokio_uring::spawn(crate::link::gate_ticker(Rc::downgrade(&gate)));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("accept on sync port failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (shared, ctx, gate, stores, receiving, ingester, mode_rx) = (
            shared.clone(),
            ctx.clone(),
            gate.clone(),
            stores.clone(),
            receiving.clone(),
            ingester.clone(),
            mode_rx.clone(),
        );
        tokio_uring::spawn(async move {
            let Some((conn, channel)) =
                accept_authenticated(&gate, &ctx, stream, addr, &[Channel::Sync, Channel::Queue])
                    .await
            else {
                return;
            };
            drop(gate);
            let mode = *mode_rx.borrow();
            match (mode, channel) {
                // A former primary pushing its queue to us.
                (EngineMode::Primary, Channel::Queue) => {
                    let idle = queue_idle(&ctx);
                    serve_queue_push(shared, conn, addr, ingester, mode_rx, idle).await
                }
                (EngineMode::Secondary, Channel::Sync) => {
                    serve_sync(shared, conn, addr, stores, receiving, mode_rx).await
                }
                _ => debug!(
                    peer = %addr,
                    "{channel:?} connection from the peer closed: this node is {mode:?}"
                ),
            }
        });
    }
}

/// The receiving session in progress, if any.
#[derive(Default)]
struct Receiving {
    busy: std::cell::Cell<bool>,
    /// Closes the session in progress (a newer one replaces it).
    closer: RefCell<Option<crate::link::FrameWriter>>,
    /// The engine's loop is in its primary branch (`run_primary`), whose
    /// takeover walk runs off the loop: sync sessions wait for it to end.
    primary_running: std::cell::Cell<bool>,
    primary_done: tokio::sync::Notify,
    /// Bumped by every authenticated sync connection: only the newest one
    /// waits for the session it replaces.
    latest: std::cell::Cell<u64>,
    /// Notified as `latest` is bumped: a connection waiting for a primary
    /// tenure to end closes at once (at most one waits, however often the
    /// peer reconnects during a long walk).
    arrived: tokio::sync::Notify,
    released: tokio::sync::Notify,
    /// The replica's scans, taken as the node became secondary (while the
    /// primary writes its takeover record), for the first manifest.
    prescan: RefCell<Option<super::receiver::Prescan>>,
    /// Bumped by whatever makes a scan under way stale (a foreign write, a
    /// role change): the scan that ends finds it moved and is dropped.
    prescan_voids: std::cell::Cell<u64>,
    /// Sources held for renames onto protected paths, from one session's
    /// receiver to the next (`apply::Applier`).
    held_for_rename: RefCell<super::apply::HeldForRename>,
    /// Content waiting for room under the names the primary sent it, from
    /// one session's receiver to the next (`replica::waiting`).
    waiting_for_room: RefCell<super::waiting::WaitingForRoom>,
}

impl Receiving {
    /// The replica's scan, taken or under way, no longer describes it.
    fn void_prescan(&self) {
        self.prescan.borrow_mut().take();
        self.prescan_voids.set(self.prescan_voids.get() + 1);
    }
}

/// The receiver's stores (their roots and indexes) between sessions: one
/// set, held by the session in progress, a scan's thread or nobody.
#[derive(Default)]
struct RecvStores {
    slot: RefCell<Option<Vec<RecvStore>>>,
    /// Lent to the scan's thread (`prescan_replica`) until it gives them back.
    lent: std::cell::Cell<bool>,
    back: tokio::sync::Notify,
}

impl RecvStores {
    /// The stores, opened (their indexes loaded) if nobody kept them; none
    /// may be lent.
    fn take_now(&self, cfg: &EngineConfig) -> Result<Vec<RecvStore>, super::fsops::FsError> {
        debug_assert!(!self.lent.get(), "the stores are lent to a scan");
        let kept = self.slot.borrow_mut().take();
        match kept {
            Some(s) => Ok(s),
            None => open_recv_stores(cfg),
        }
    }

    /// The stores, once a scan that has them gives them back: never a
    /// second copy of an index beside the lent one.
    async fn take(&self, cfg: &EngineConfig) -> Result<Vec<RecvStore>, super::fsops::FsError> {
        self.returned().await;
        self.take_now(cfg)
    }

    /// Once no scan has the stores.
    async fn returned(&self) {
        while self.lent.get() {
            let back = self.back.notified();
            if self.lent.get() {
                back.await;
            }
        }
    }

    fn put(&self, st: Vec<RecvStore>) {
        *self.slot.borrow_mut() = Some(st);
    }

    /// A scan ends: its stores (`None`: lost with a panicked thread, opened
    /// again by the next taker) are free again.
    fn give_back(&self, st: Option<Vec<RecvStore>>) {
        *self.slot.borrow_mut() = st;
        self.lent.set(false);
        self.back.notify_waiters();
    }
}

/// Serves the primary's sync connection. The newest authenticated
/// connection wins: the peer reconnected (it restarted, or the old
/// connection is half-dead), so the session in progress is cut.
async fn serve_sync(
    shared: Rc<Shared>,
    conn: Conn,
    addr: SocketAddr,
    stores: Rc<RecvStores>,
    receiving: Rc<Receiving>,
    mut mode_rx: watch::Receiver<EngineMode>,
) {
    let generation = receiving.latest.get() + 1;
    receiving.latest.set(generation);
    receiving.arrived.notify_waiters();
    // A tenure as primary this node just left may still be walking its
    // stores for the takeover record (off this loop): no session lands in
    // the tree it reads, nor before its record and mark are written.
    if receiving.primary_running.get() {
        info!(peer = %addr, "sync connection from the primary waits for this node's tenure as primary to end (its takeover walk may still run)");
    }
    while receiving.primary_running.get() {
        let done = receiving.primary_done.notified();
        let newer = receiving.arrived.notified();
        if !receiving.primary_running.get() {
            break;
        }
        tokio::select! {
            _ = done => {}
            _ = newer => {}
        }
        if receiving.latest.get() != generation {
            debug!(peer = %addr, "a sync connection waiting for this node's tenure as primary to end is replaced by a newer one");
            return;
        }
    }
    if receiving.latest.get() != generation {
        return; // a newer connection took over meanwhile
    }
    if *mode_rx.borrow() != EngineMode::Secondary {
        // The role came back meanwhile: this connection is for a replica.
        debug!(peer = %addr, "sync connection closed: this node is no longer secondary");
        return;
    }
    loop {
        let released = receiving.released.notified();
        if !receiving.busy.get() {
            break;
        }
        if let Some(old) = receiving.closer.borrow_mut().take() {
            info!(peer = %addr, "a new sync connection from the primary replaces the one in progress");
            let _ = old.shutdown();
        }
        released.await;
        if receiving.latest.get() != generation {
            return; // an even newer connection took over
        }
    }
    receiving.busy.set(true);
    *receiving.closer.borrow_mut() = Some(conn.closer());
    // A scan of the replica under way has them: the session waits for it
    // and takes the scan for its first manifest.
    let recv_stores = match stores.take(&shared.cfg).await {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot open mailstore roots for receiving: {e}");
            *shared.stats.last_error.lock().expect("error lock") = Some(e.to_string());
            receiving.busy.set(false);
            receiving.closer.borrow_mut().take();
            receiving.released.notify_waiters();
            return;
        }
    };
    if receiving.latest.get() != generation || receiving.closer.borrow().is_none() {
        // Cut while it waited for a scan (a newer connection, a foreign
        // write): the stores and the scan are left for the next session.
        stores.put(recv_stores);
        receiving.busy.set(false);
        receiving.closer.borrow_mut().take();
        receiving.released.notify_waiters();
        return;
    }
    let mut receiver = Receiver::new(
        recv_stores,
        shared.excludes.clone(),
        shared.stats.clone(),
        shared.cfg.durability,
    );
    receiver.state_dir = Some(shared.cfg.state_dir.clone());
    receiver.served = shared.served.clone();
    receiver.fence = Some(shared.fence.clone());
    receiver.prescanned = receiving.prescan.borrow_mut().take();
    receiver.hold_for_rename(receiving.held_for_rename.take());
    receiver.wait_for_room(receiving.waiting_for_room.take());
    receiver.flusher = Some(shared.durable.clone());
    receiver.flush_alarm = shared.cfg.flush_alarm;
    let session_epoch = receiver.session_epoch.clone();
    let mut fence_rx = shared.fence.subscribe();
    shared.stats.connected.store(true, Relaxed);
    info!(peer = %addr, "sync connection from primary up");
    let (r, w) = conn.split();
    let res = tokio::select! {
        res = receiver.serve(r, w.clone()) => res.map_err(|e| e.to_string()),
        _ = async {
            while mode_rx.changed().await.is_ok() {
                if *mode_rx.borrow() != EngineMode::Secondary { return; }
            }
        } => Err("no longer secondary".to_string()),
        seen = async {
            // A higher epoch became known (the node's own record, or a
            // newer primary's session): this session's sender is deposed.
            loop {
                let seen = *fence_rx.borrow_and_update();
                if session_epoch.get().is_some_and(|e| e < seen) {
                    return seen;
                }
                if fence_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        } => Err(format!(
            "cut: the session's epoch {} is below {seen}, the highest this node knows",
            session_epoch.get().unwrap_or_default()
        )),
    };
    let _ = w.shutdown();
    // Before the wait below: the node may be primary by now, with a sync
    // session of its own that shares the flag.
    shared.stats.connected.store(false, Relaxed);
    // A session dropped above (a role change, a higher epoch, shutdown)
    // hears its flush in flight here, as one that ended does in `serve`.
    receiver.settle_flush().await;
    if res.is_err() {
        // Whatever the session had staged and not landed is dropped now,
        // not at the next start.
        receiver.abandon();
    }
    receiver.save_indexes();
    // Passed on to the next session's receiver, unless the node has become
    // primary meanwhile (which dropped them, file and all, while this
    // session was still ending).
    let held = receiver.take_held_for_rename();
    let waiting = receiver.take_waiting_for_room();
    if *mode_rx.borrow() != EngineMode::Primary {
        *receiving.held_for_rename.borrow_mut() = held;
        *receiving.waiting_for_room.borrow_mut() = waiting;
    }
    match res {
        Ok(()) => info!(peer = %addr, "sync connection closed"),
        Err(e) => info!(peer = %addr, "sync connection ended: {e}"),
    }
    stores.put(receiver.stores);
    receiving.busy.set(false);
    receiving.closer.borrow_mut().take();
    receiving.released.notify_waiters();
}

fn store_names(cfg: &EngineConfig) -> Vec<String> {
    cfg.stores.iter().map(|s| s.name.clone()).collect()
}

/// The sources a replica held for renames before the process restarted
/// (`held`). A file that cannot be read or understood stops the start:
/// without it, the next session could delete a message's only copy here.
fn held_at_start(cfg: &EngineConfig) -> Result<super::apply::HeldForRename, EngineError> {
    let (mut held, dropped) = super::held::load(&cfg.state_dir, &store_names(cfg))?;
    // A folder rename keeps its old names held until it is durable: after
    // a power loss one of the two is there, and the other names nothing.
    // The other is let go of once the stores are flushed (a rename the
    // last process made, not yet durable, is then); if a flush fails,
    // every name stays held.
    let before = held.len();
    let stores: std::collections::BTreeSet<usize> = held.keys().map(|(s, _)| *s).collect();
    let flushed = stores.iter().all(|s| {
        let root = &cfg.stores[*s].replica_root;
        crate::io::syncfs(root)
            .inspect_err(|e| warn!(store = %cfg.stores[*s].name, "cannot flush {}: {e}; the held names stay", root.display()))
            .is_ok()
    });
    if flushed {
        held.retain(|(s, h), _| {
            !matches!(
                std::fs::symlink_metadata(cfg.stores[*s].replica_root.join(h)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound
            )
        });
    }
    if held.len() < before {
        info!(
            gone = before - held.len(),
            "held names no longer in the tree (a folder rename's other name) let go"
        );
    }
    if !held.is_empty() {
        info!(
            held = held.len(),
            "sources held for renames onto conflicts that cannot be kept aside, kept across the restart"
        );
    }
    if dropped > 0 {
        warn!(
            dropped,
            "sources held for renames in stores no longer configured are not held"
        );
    }
    Ok(held)
}

/// The node serves as primary: the sources held for renames are its own
/// tree's names now, held for nothing (also on disk).
fn drop_held_for_rename(shared: &Shared, receiving: &Receiving) {
    let had = std::mem::take(&mut *receiving.held_for_rename.borrow_mut());
    let on_disk = super::held::path(&shared.cfg.state_dir).exists();
    if had.is_empty() && !on_disk {
        return;
    }
    let names = store_names(&shared.cfg);
    if let Err(e) = super::held::save(&shared.cfg.state_dir, &names, &Default::default()) {
        warn!("cannot remove the sources held for renames: {e}; they are released at the next session as a replica");
    }
}

fn open_recv_stores(cfg: &EngineConfig) -> Result<Vec<RecvStore>, super::fsops::FsError> {
    cfg.stores
        .iter()
        .map(|s| {
            // The receiving side keeps its own index: its tree is the replica.
            let index_name = if s.replica_root == s.root {
                s.name.clone()
            } else {
                format!("{}-replica", s.name)
            };
            std::fs::create_dir_all(&s.replica_root).map_err(|source| {
                super::fsops::FsError::Io {
                    op: "create",
                    path: s.replica_root.display().to_string(),
                    source,
                }
            })?;
            Ok(RecvStore {
                conflicts: s.replica_root == s.root && s.period.is_none(),
                name: s.name.clone(),
                root: Root::open(&s.replica_root, &s.internal)?
                    .allow_special_modes(cfg.allow_special_modes),
                index: Index::load(&cfg.state_dir, &index_name),
            })
        })
        .collect()
}

/// A connection to the peer's sync port. A peer whose host is down
/// answers no SYN: give up after the link's I/O timeout, as a cut link
/// would, not after the kernel's two minutes of retries.
async fn connect_within(
    ctx: &LinkCtx,
) -> Result<tokio_uring::net::TcpStream, crate::link::LinkError> {
    let connect = tokio_uring::net::TcpStream::connect(ctx.peer_addr);
    tokio::time::timeout(ctx.io_timeout, connect)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map_err(|source| crate::link::LinkError::Io {
            peer: ctx.peer_addr,
            op: "connect",
            source,
        })
}

/// Silence allowed on a queue connection (see [`push::QUEUE_IDLE_MIN`]).
fn queue_idle(ctx: &LinkCtx) -> Duration {
    ctx.io_timeout.max(push::QUEUE_IDLE_MIN)
}

/// Runs one queue push to the primary, retrying the connection for a while
/// (the peer accepts pushes only once it acts as primary).
async fn run_push(
    shared: &Rc<Shared>,
    ctx: &Rc<LinkCtx>,
    mode_rx: &watch::Receiver<EngineMode>,
    requested_epoch: u64,
) -> PushOutcome {
    let q = &shared.cfg.queue;
    shared.queue.running.store(true, Relaxed);
    let mut backoff = Backoff::with_max(Duration::from_secs(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let res = loop {
        let mode = *mode_rx.borrow();
        if mode != EngineMode::Secondary {
            break PushOutcome::Cancelled(format!(
                "this node is no longer secondary ({mode:?}): its queue is not handed over"
            ));
        }
        let attempt = async {
            let stream = connect_within(ctx).await?;
            let mut conn = Conn::new(stream, ctx.peer_addr);
            handshake(&mut conn, ctx, Side::Initiator, Channel::Queue).await?;
            let (r, w) = conn.split();
            // Addressed to the newest primary tenure this node knows of.
            let epoch = requested_epoch.max(shared.fence.seen());
            let out = push::push(
                q.layout,
                &q.queue_dir,
                r,
                w.clone(),
                &shared.queue.report,
                epoch,
                queue_idle(ctx),
            )
            .await;
            let _ = w.shutdown();
            out
        };
        match attempt.await {
            Ok(report) => break PushOutcome::Done(report),
            Err(e) => {
                let last = e.to_string();
                debug!("queue push attempt failed: {last}");
                if std::time::Instant::now() > deadline {
                    break PushOutcome::Failed(format!("queue push gave up after 120s: {last}"));
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    };
    shared.queue.running.store(false, Relaxed);
    match &res {
        PushOutcome::Failed(e) => {
            warn!("queue push failed: {e}");
            *shared.queue.last_error.lock().expect("queue error lock") = Some(e.clone());
        }
        PushOutcome::Cancelled(_) | PushOutcome::Done(_) => {
            *shared.queue.last_error.lock().expect("queue error lock") = None;
        }
    }
    res
}

async fn serve_queue_push(
    shared: Rc<Shared>,
    conn: Conn,
    addr: SocketAddr,
    ingester: Rc<RefCell<Option<Ingester>>>,
    mut mode_rx: watch::Receiver<EngineMode>,
    idle: Duration,
) {
    // One push at a time: the ledger has a single owner.
    let taken = ingester.borrow_mut().take();
    let Some(mut ing) = taken else {
        warn!(peer = %addr, "queue push refused: another push is being ingested, or the ledger could not be opened");
        return;
    };
    let (r, w) = conn.split();
    let tenure = shared.fence.seen();
    let res = tokio::select! {
        res = ing.serve(r, w.clone(), tenure, idle) => res.map_err(|e| e.to_string()),
        _ = async {
            // Deposed (a newer primary won): cut. What was acknowledged is
            // durable and in the ledger; the rest the pusher keeps and
            // sends again. (This node's own epoch rising while it serves
            // is no reason: the push goes on.)
            while mode_rx.changed().await.is_ok() {
                if *mode_rx.borrow() != EngineMode::Primary {
                    return;
                }
            }
            std::future::pending::<()>().await
        } => Err("cut: this node is no longer primary".to_string()),
    };
    if let Err(e) = res {
        warn!(peer = %addr, "queue push from peer ended: {e}");
    }
    let _ = w.shutdown();
    *shared.queue.ingest.lock().expect("ingest lock") = ing.stats.clone();
    *ingester.borrow_mut() = Some(ing);
}
