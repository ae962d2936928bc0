//! The `hasync run` driver: executes the failover core's actions with real
//! sockets, files and clocks, on one tokio-uring thread.

mod chores;
pub mod control;
pub mod metrics;
pub mod roles;
pub mod state;
pub mod systemd;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError};
use crate::failover::{Action, Core, CoreConfig, EpochRecord, Event, Heartbeat, Role};
use crate::link::{self, auth::LinkKey, LinkCtx, LinkStats};
use crate::replica::engine::{
    Engine, EngineConfig, EngineError, EngineMode, PushOutcome, QueueSettings, StoreSpec,
    QUEUE_STORE,
};
use crate::replica::sender::CommitOutcome;
use control::{
    LinkStatus, Logged, PeerStatus, QueuePushStatus, Request, Response, Status, REQUEST_BYTES_MAX,
};

/// How many alarms and role changes status keeps.
const STATUS_HISTORY: usize = 32;
/// Bound on queued control requests and inbound heartbeats.
const CONTROL_QUEUE: usize = 16;
/// Control connections answered at once at most; more are told the node
/// is busy.
const CONTROL_CONNS_MAX: usize = 8;
/// A control request that gets no answer within this long is answered
/// with an error.
const CONTROL_REPLY_WAIT: Duration = Duration::from_secs(60);
const HEARTBEAT_QUEUE: usize = 64;
/// `hasync status` shows the versions kept aside as counted at most this
/// long ago (counting walks the conflicts directories, off the loop).
const CONFLICTS_RECOUNT: Duration = Duration::from_secs(2);

/// Why the daemon could not start or had to stop. Each names what and where.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot listen on heartbeat link address {addr} (link.listen): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    StateWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another hasync daemon is already running with state directory {0} (its control socket answers)")]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start the daemon's {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("quorum: {0}")]
    Quorum(std::io::Error),
    #[error("service addresses: {0}")]
    Vip(std::io::Error),
}

/// The replicated trees: every mailstore in place, and with
/// `queue.sync = "continuous"` the queue into a replica outside the
/// secondary's live queue (`<state_dir>/queue-replica`).
fn store_specs(cfg: &Config) -> Vec<StoreSpec> {
    let mut v: Vec<StoreSpec> = cfg
        .mailstores
        .iter()
        .map(|(n, p)| StoreSpec {
            name: n.clone(),
            root: p.clone(),
            replica_root: p.clone(),
            period: None,
            internal: cfg.internal_dir(n),
            kind: cfg.mailstore_kinds.get(n).copied(),
        })
        .collect();
    use crate::config::QueueSync;
    if cfg.queue.sync != QueueSync::Off {
        v.push(StoreSpec {
            name: QUEUE_STORE.to_string(),
            root: cfg.queue_dir.clone(),
            replica_root: cfg.state_dir.join("queue-replica"),
            period: (cfg.queue.sync == QueueSync::Periodic).then_some(cfg.queue.sync_interval),
            // Beside the replica, in state_dir (same filesystem by construction).
            internal: cfg.state_dir.join("internal").join("queue-replica"),
            kind: None,
        });
    }
    v
}

/// Starts the daemon and runs until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    run_with(cfg, None)
}

/// A role change, as embedders see it ([`crate::Node::roles`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub role: Role,
    pub epoch: u64,
    pub reason: String,
}

/// The channels an embedding process holds instead of signals and the
/// control socket's clients.
pub(crate) struct Embedding {
    /// Gets the node's request channel once every port is bound.
    pub ready: std::sync::mpsc::Sender<mpsc::Sender<ControlMsg>>,
    pub shutdown: oneshot::Receiver<()>,
    pub roles: watch::Sender<RoleChange>,
}

/// Runs the node on the calling thread until SIGTERM/SIGINT, or, embedded,
/// until `embed.shutdown`.
pub(crate) fn run_with(cfg: Config, embed: Option<Embedding>) -> Result<(), DaemonError> {
    cfg.validate_filesystem()?;
    let secret = cfg.read_secret()?;
    match crate::io::remove_stale_temps(&cfg.state_dir) {
        Ok(0) => {}
        Ok(n) => {
            info!(state_dir = %cfg.state_dir.display(), "removed {n} temporary files an interrupted write left")
        }
        Err(e) => warn!(state_dir = %cfg.state_dir.display(), "cannot clean temporary files: {e}"),
    }
    let record = state::load(&cfg.state_dir)?;
    // The epoch record says durably whether this node served as primary
    // (before it acted as one); the engine's own mark may not have been
    // written yet when it died. A former primary's mailstores are
    // reconciled exactly (see `replica::takeover`).
    // The mark also says the tenure's epoch (what this node tells a new
    // primary it last served at): one that died before writing it at its
    // last promotion has it from the epoch record here.
    let marked = crate::replica::takeover::is_former_primary(&cfg.state_dir)
        .then(|| crate::replica::takeover::served_epoch(&cfg.state_dir));
    if let Some(held) = record
        .held_primary
        .filter(|&held| marked.is_none_or(|served| served < Some(held)))
    {
        crate::replica::takeover::mark_former_primary(&cfg.state_dir, held).map_err(|source| {
            DaemonError::StateWrite {
                path: cfg
                    .state_dir
                    .join(crate::replica::takeover::FORMER_PRIMARY_FILE),
                source,
            }
        })?;
    }
    let key = LinkKey::from_secret(&secret);
    let (push_done_tx, push_done_rx) = mpsc::unbounded_channel();
    let engine = Engine::start(
        EngineConfig {
            node_name: cfg.node_name.clone(),
            peer_name: cfg.link.peer_name.clone(),
            key: key.clone(),
            stores: store_specs(&cfg),
            exclude: cfg.replication.exclude.clone(),
            state_dir: cfg.state_dir.clone(),
            sync_listen: cfg.replication.sync_listen,
            sync_peer: cfg.replication.sync_peer,
            verify_interval: cfg.replication.verify_interval,
            flush_alarm: cfg.replication.flush_alarm,
            durability: cfg.replication.durability,
            zero_copy: cfg.replication.zero_copy,
            allow_special_modes: cfg.replication.allow_special_modes,
            watch_foreign_writes: cfg.replication.watch_foreign_writes,
            io_timeout: cfg.detection_time().max(Duration::from_secs(1)) * 4,
            queue: QueueSettings {
                layout: cfg.queue.layout,
                queue_dir: cfg.queue_dir.clone(),
                ledger: cfg.state_dir.join("queue-ledger.log"),
                ledger_max_entries: cfg.queue.ledger_max_entries,
                ledger_max_age: cfg.queue.ledger_max_age,
                hook: cfg.queue.post_ingest_hook.clone(),
                staging: cfg
                    .internal_dir(crate::config::QUEUE_INTERNAL)
                    .join("staging"),
            },
        },
        push_done_tx,
    )?;
    // Sessions from below the durable epoch are refused from the start.
    engine.observe_epoch(record.epoch);
    tokio_uring::start(async move {
        let mut node = Node::start(cfg, key, record, engine, push_done_rx).await?;
        let shutdown = match embed {
            Some(e) => {
                node.systemd = systemd::Systemd::disabled();
                node.roles_tx = Some(e.roles);
                let _ = e.ready.send(node.control_tx.clone());
                Some(e.shutdown)
            }
            None => None,
        };
        node.run(shutdown).await
    })
}

pub(crate) type ControlMsg = (Request, oneshot::Sender<Response>);

/// How a switchover refused for what it would leave behind starts (the
/// command line's `--wait` retries on it).
pub const NOT_SAFE: &str = "switchover not safe now: ";
/// Changes queued or in flight beyond which a switchover is refused: the
/// drain before the peer promotes would not finish in time.
const SWITCHOVER_BACKLOG_MAX: u64 = 5_000;

#[cfg(feature = "etcd")]
type LeaseMsg = crate::lease::LeaseEvent;
#[cfg(not(feature = "etcd"))]
type LeaseMsg = std::convert::Infallible;

struct Node {
    cfg: Config,
    core: Core,
    link: Rc<LinkCtx>,
    heartbeat_tx: watch::Sender<Option<Heartbeat>>,
    heartbeat_rx: mpsc::Receiver<Heartbeat>,
    control_rx: mpsc::Receiver<ControlMsg>,
    /// Disk work off the loop (see `chores`): conflicts, the peer's epoch.
    chores: chores::Chores,
    /// The configured directories, checked on a thread of their own.
    self_checks: chores::SelfChecks,
    /// Kept-aside versions on this node (count, oldest kept at, unix s),
    /// as the chores thread last counted them; a count in flight.
    conflicts_seen: Arc<Mutex<ConflictsSeen>>,
    /// This node serves as primary now (for the chores thread: a restore
    /// of kept versions into the live tree stops when it no longer does).
    serving_primary: Arc<std::sync::atomic::AtomicBool>,
    /// Each store's name, root and internal directory.
    store_dirs: Arc<Vec<StoreDirs>>,
    /// The peer's epoch not noted yet (the chores thread was busy).
    peer_epoch_unnoted: Option<u64>,
    persist_tx: mpsc::UnboundedSender<EpochRecord>,
    persisted_rx: mpsc::UnboundedReceiver<Result<EpochRecord, String>>,
    socket_path: PathBuf,
    started: (Instant, SystemTime),
    alarms: VecDeque<Logged>,
    transitions: VecDeque<Logged>,
    push_requested: u64,
    push_last: Option<(u64, u64)>,
    engine: Engine,
    catch_up_reported: bool,
    /// What the core was last told of this node's stores.
    replica_fill_told: Option<crate::failover::ReplicaFill>,
    push_done_rx: mpsc::UnboundedReceiver<PushOutcome>,
    gate_stats: Arc<link::gate::GateStats>,
    roles: roles::RoleHooks,
    role_rx: mpsc::UnboundedReceiver<roles::RoleMsg>,
    /// The role before the last change (for the hooks' environment).
    prev_role: Role,
    /// `on_secondary` already ran for a switchover being prepared.
    stopped_for_handover: bool,
    /// The number of the latest switchover preparation asked of the hooks.
    prepare_id: u64,
    /// The engine's current primary tenure.
    tenure: u64,
    /// The highest of the peer's own epochs this node has heard of (in a
    /// heartbeat or its durable record): a tenure the peer took before.
    /// Only the peer's own epochs are tenures it knows of for sure (it took
    /// them durably before anyone heard); one of this node's may never have
    /// reached it, and it may later serve below that.
    peer_epoch_known: u64,
    systemd: systemd::Systemd,
    /// Requests from an embedding process (the control socket's thread
    /// holds another sender).
    control_tx: mpsc::Sender<ControlMsg>,
    /// Role changes for an embedding process.
    roles_tx: Option<watch::Sender<RoleChange>>,
    /// Set as the node stops: the accept loops of the control socket and
    /// the metrics port end at their next connection.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// More heartbeat paths (`link.paths`): each with its own connections,
    /// and whether its loss is alarmed now.
    paths: Vec<(crate::config::HeartbeatPath, Rc<LinkCtx>, bool)>,
    /// The main path's loss is alarmed now.
    main_path_alarmed: bool,
    /// Ping quorum: the prober and its verdicts.
    prober: Option<crate::quorum::Prober>,
    quorum_rx: mpsc::UnboundedReceiver<bool>,
    /// Etcd mode: the lease thread and its answers.
    #[cfg(feature = "etcd")]
    lease: Option<crate::lease::Lease>,
    lease_rx: mpsc::UnboundedReceiver<LeaseMsg>,
    /// `[[vip]]`: the service addresses, and the last error alarmed.
    vips: Option<crate::vip::Vips>,
    vip_alarmed: Option<String>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn push_bounded(q: &mut VecDeque<Logged>, message: String) {
    if q.len() == STATUS_HISTORY {
        q.pop_front();
    }
    q.push_back(Logged {
        at_unix_ms: unix_ms(SystemTime::now()),
        message,
    });
}

impl Node {
    async fn start(
        cfg: Config,
        key: LinkKey,
        record: EpochRecord,
        engine: Engine,
        push_done_rx: mpsc::UnboundedReceiver<PushOutcome>,
    ) -> Result<Node, DaemonError> {
        let now = Instant::now();
        let core_cfg = CoreConfig {
            node_name: cfg.node_name.clone(),
            peer_name: cfg.link.peer_name.clone(),
            priority: cfg.priority,
            heartbeat_interval: cfg.link.heartbeat_interval,
            heartbeat_lost_threshold: cfg.link.heartbeat_lost_threshold,
            startup_wait: cfg.link.startup_wait,
            recovery: cfg.recovery,
            tie_break: cfg.tie_break,
            prepare_handover: Some(cfg.hooks.switchover_timeout),
            quorum: match cfg.quorum.mode {
                crate::config::QuorumMode::None => crate::failover::QuorumRule::None,
                // The peer's own detection plus a probe round: time for an
                // isolated primary to see both losses and step down first.
                crate::config::QuorumMode::Ping => crate::failover::QuorumRule::Ping {
                    grace: cfg.detection_time() + cfg.quorum.interval,
                },
                // The peer's detection plus a heartbeat before asking etcd;
                // a primary stops two heartbeats (at least 0.5 s) before its
                // lease would run out.
                crate::config::QuorumMode::Etcd => crate::failover::QuorumRule::Lease {
                    grace: cfg.detection_time() + cfg.link.heartbeat_interval,
                    margin: (cfg.link.heartbeat_interval * 2).max(Duration::from_millis(500)),
                    ttl: cfg.quorum.lease_ttl,
                },
            },
        };
        info!(
            node = %cfg.node_name,
            epoch = record.epoch,
            held_primary = ?record.held_primary,
            listen = %cfg.link.listen,
            peer = %cfg.link.peer,
            "hasync starting"
        );

        let listener = crate::io::bind_listener(cfg.link.listen, Duration::from_secs(10)).map_err(
            |source| DaemonError::Listen {
                addr: cfg.link.listen,
                source,
            },
        )?;
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        let socket_path = control::socket_path(&cfg.state_dir);
        let control_listener = bind_control(&socket_path)?;

        // Handshakes and silence are bounded by the failure-detection window
        // (at least a second, so that a slow handshake on a busy host is not
        // mistaken for a dead peer).
        let io_timeout = cfg.detection_time().max(Duration::from_secs(1));
        let link = Rc::new(LinkCtx {
            node_name: cfg.node_name.clone(),
            peer_name: cfg.link.peer_name.clone(),
            peer_addr: cfg.link.peer,
            key,
            io_timeout,
            stats: LinkStats::default(),
            redial: tokio::sync::Notify::new(),
        });
        let (heartbeat_tx, heartbeat_out) = watch::channel(None);
        let (to_core, heartbeat_rx) = mpsc::channel(HEARTBEAT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let control_tx_node = control_tx.clone();
        let (persist_tx, persist_rx) = mpsc::unbounded_channel();
        let (persisted_tx, persisted_rx) = mpsc::unbounded_channel();

        tokio_uring::spawn(link::run_outbound(link.clone(), heartbeat_out));
        let gate_stats = Arc::new(link::gate::GateStats::default());
        let gate = Rc::new(link::gate::Gate::new(
            "heartbeat",
            link::gate::Limits::default(),
            Some(cfg.link.peer.ip()),
            gate_stats.clone(),
        ));
        tokio_uring::spawn(link::run_listener(
            link.clone(),
            listener,
            gate,
            to_core.clone(),
        ));
        // More heartbeat paths: the same heartbeats out on each, every one
        // received into the core (it keys on the peer, not the path).
        let mut paths = Vec::new();
        for p in &cfg.link.paths {
            let listener =
                crate::io::bind_listener(p.listen, Duration::from_secs(10)).map_err(|source| {
                    DaemonError::Listen {
                        addr: p.listen,
                        source,
                    }
                })?;
            let ctx = Rc::new(LinkCtx {
                node_name: cfg.node_name.clone(),
                peer_name: cfg.link.peer_name.clone(),
                peer_addr: p.peer,
                key: link.key.clone(),
                io_timeout,
                stats: LinkStats::default(),
                redial: tokio::sync::Notify::new(),
            });
            let gate = Rc::new(link::gate::Gate::new(
                "heartbeat",
                link::gate::Limits::default(),
                Some(p.peer.ip()),
                gate_stats.clone(),
            ));
            tokio_uring::spawn(link::run_outbound(ctx.clone(), heartbeat_tx.subscribe()));
            tokio_uring::spawn(link::run_listener(
                ctx.clone(),
                tokio_uring::net::TcpListener::from_std(listener),
                gate,
                to_core.clone(),
            ));
            paths.push((*p, ctx, false));
        }
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(addr) = cfg.metrics_listen {
            let listener =
                metrics::bind(addr).map_err(|source| DaemonError::Listen { addr, source })?;
            let to_node = control_tx.clone();
            let stop = stopping.clone();
            std::thread::Builder::new()
                .name("hasync-metrics".into())
                .spawn(move || metrics::serve(listener, to_node, stop))
                .map_err(|source| DaemonError::Listen { addr, source })?;
            info!(%addr, "Prometheus metrics at /metrics");
        }
        std::thread::Builder::new()
            .name("hasync-control".into())
            .spawn({
                let stop = stopping.clone();
                move || serve_control(control_listener, control_tx, stop)
            })
            .map_err(|source| DaemonError::ControlSocket {
                path: socket_path.clone(),
                source,
            })?;
        tokio_uring::spawn(persist_worker(
            cfg.state_dir.clone(),
            persist_rx,
            persisted_tx,
        ));

        let vips = if cfg.vips.is_empty() {
            None
        } else {
            let v = crate::vip::Vips::start(cfg.vips.clone()).map_err(DaemonError::Vip)?;
            // A previous run (killed) may have left them: not ours until
            // this node is primary.
            v.release_in_background();
            Some(v)
        };
        let (roles, role_rx) = roles::RoleHooks::start(cfg.hooks.clone(), vips.clone());
        let (quorum_tx, quorum_rx) = mpsc::unbounded_channel();
        let prober = match cfg.quorum.mode {
            crate::config::QuorumMode::Ping => Some(
                crate::quorum::Prober::start(
                    cfg.quorum.targets.clone(),
                    cfg.quorum.interval,
                    cfg.detection_time(),
                    quorum_tx,
                )
                .map_err(DaemonError::Quorum)?,
            ),
            crate::config::QuorumMode::None | crate::config::QuorumMode::Etcd => None,
        };
        let (lease_tx, lease_rx) = mpsc::unbounded_channel();
        #[cfg(feature = "etcd")]
        let lease = match cfg.quorum.mode {
            crate::config::QuorumMode::Etcd => Some(
                crate::lease::Lease::start(
                    cfg.quorum.endpoints.clone(),
                    cfg.quorum.key.clone(),
                    cfg.node_name.clone(),
                    cfg.quorum.lease_ttl,
                    lease_tx,
                )
                .map_err(DaemonError::Quorum)?,
            ),
            _ => None,
        };
        #[cfg(not(feature = "etcd"))]
        drop(lease_tx);
        let chores = chores::Chores::start().map_err(|source| DaemonError::Thread {
            what: "chores",
            source,
        })?;
        // As often as the peer checks our heartbeats (see `run`).
        let self_checks = {
            let c = cfg.clone();
            chores::SelfChecks::start(
                cfg.link.heartbeat_interval.max(Duration::from_millis(100)),
                move || self_check_dirs(&c),
            )
            .map_err(|source| DaemonError::Thread {
                what: "self-check",
                source,
            })?
        };
        let store_dirs = Arc::new(
            cfg.mailstores
                .iter()
                .map(|(name, root)| StoreDirs {
                    name: name.clone(),
                    root: root.clone(),
                    internal: cfg.internal_dir(name),
                })
                .collect(),
        );
        // The core's first heartbeat says what this node's stores hold.
        let fill = engine.replica_fill();
        Ok(Node {
            chores,
            self_checks,
            conflicts_seen: Default::default(),
            serving_primary: Default::default(),
            store_dirs,
            peer_epoch_unnoted: None,
            roles,
            role_rx,
            prev_role: Role::Negotiating,
            stopped_for_handover: false,
            prepare_id: 0,
            tenure: 0,
            // After a restart only the durable record is known: the peer's
            // epoch if it is one, else none (a carried part keeps the floor
            // of its own tenure; a new one taken now counts for no peer).
            peer_epoch_known: if crate::failover::epoch_taken_by(
                &cfg.link.peer_name,
                &cfg.node_name,
                record.epoch,
            ) {
                record.epoch
            } else {
                0
            }
            .max(
                read_peer_epoch(&cfg.state_dir, &cfg.link.peer_name)
                    .filter(|&e| {
                        crate::failover::epoch_taken_by(&cfg.link.peer_name, &cfg.node_name, e)
                    })
                    .unwrap_or(0),
            ),
            systemd: systemd::Systemd::from_env(),
            control_tx: control_tx_node,
            roles_tx: None,
            stopping,
            paths,
            main_path_alarmed: false,
            prober,
            quorum_rx,
            #[cfg(feature = "etcd")]
            lease,
            lease_rx,
            vips,
            vip_alarmed: None,
            core: Core::start(core_cfg, record, fill, now),
            cfg,
            link,
            heartbeat_tx,
            heartbeat_rx,
            control_rx,
            persist_tx,
            persisted_rx,
            socket_path,
            started: (now, SystemTime::now()),
            alarms: VecDeque::new(),
            transitions: VecDeque::new(),
            push_requested: 0,
            push_last: None,
            engine,
            catch_up_reported: false,
            replica_fill_told: Some(fill),
            push_done_rx,
            gate_stats,
        })
    }

    async fn run(mut self, mut shutdown: Option<oneshot::Receiver<()>>) -> Result<(), DaemonError> {
        use tokio::signal::unix::{signal, SignalKind};
        // Embedded, the process is the embedder's: its signals too.
        let (mut term, mut int) = if shutdown.is_none() {
            (
                Some(signal(SignalKind::terminate()).map_err(DaemonError::Signal)?),
                Some(signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?),
            )
        } else {
            (None, None)
        };
        // Checking our own directories more often than the peer checks our
        // heartbeats would be wasted work; less often would leave a broken
        // node primary for longer than a crashed one.
        let mut self_check = tokio::time::interval(
            self.cfg
                .link
                .heartbeat_interval
                .max(Duration::from_millis(100)),
        );
        self_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Ports are bound and the config is valid: ready. The watchdog is
        // fed from this loop, so a loop that stops turning is restarted.
        let mut watchdog = self.systemd.watchdog_every().map(tokio::time::interval);
        self.systemd.ready(&format!(
            "{} at epoch {}",
            self.core.role(),
            self.core.epoch()
        ));

        // Before any timer of the core runs: whether it may take over on its
        // own (an incomplete replica may not).
        self.report_replica_fill();
        loop {
            self.execute_actions();
            let deadline = self
                .core
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.report_replica_fill();
                    self.core.handle_timeout(Instant::now());
                }
                Some(hb) = self.heartbeat_rx.recv() => {
                    self.report_replica_fill();
                    self.note_epoch_heard(&hb.node, hb.epoch);
                    self.core.handle_event(Instant::now(), Event::Heartbeat(hb));
                }
                Some(res) = self.persisted_rx.recv() => {
                    let ev = match res {
                        Ok(rec) => {
                            self.engine.observe_epoch(rec.epoch);
                            let peer = self.cfg.link.peer_name.clone();
                            self.note_epoch_heard(&peer, rec.epoch);
                            Event::Persisted(rec)
                        }
                        Err(why) => Event::PersistFailed(why),
                    };
                    self.core.handle_event(Instant::now(), ev);
                }
                Some(res) = self.push_done_rx.recv() => self.on_push_done(res),
                Some(msg) = self.role_rx.recv() => self.on_role_msg(msg),
                Some(ok) = self.quorum_rx.recv() => {
                    self.core.handle_event(Instant::now(), Event::Quorum(ok));
                }
                Some(ev) = self.lease_rx.recv() => self.on_lease(ev),
                Some((req, reply)) = self.control_rx.recv() => {
                    if let Request::Commit { path } = req {
                        // Waits for the peer without holding up the loop.
                        let rx = self.engine.commit(&path, self.cfg.queue.commit_timeout);
                        tokio_uring::spawn(async move {
                            let resp = match rx.await {
                                Ok(CommitOutcome::Replicated { waited }) => Response::message(format!(
                                    "replicated: {} is durable on both nodes ({} ms)",
                                    path.display(),
                                    waited.as_millis()
                                )),
                                Ok(CommitOutcome::LocalOnly { reason }) => Response::message(format!("local-only: {reason}")),
                                Err(_) => Response::message("local-only: the replication engine stopped before confirming"),
                            };
                            let _ = reply.send(resp);
                        });
                    } else {
                        self.handle_control(req, reply);
                    }
                }
                Some(result) = self.self_checks.recv() => {
                    self.core.handle_event(Instant::now(), Event::SelfCheck(result));
                }
                _ = self_check.tick() => {
                    self.watch_paths();
                    self.watch_vips();
                    // The check itself runs on its own thread (`chores`):
                    // here only one that does not return is reported.
                    // A result that waited while the loop was held up is
                    // no hang.
                    while let Some(result) = self.self_checks.try_recv() {
                        self.core.handle_event(Instant::now(), Event::SelfCheck(result));
                    }
                    let now = Instant::now();
                    if let Some(why) = self.self_checks.hung(now) {
                        self.core.handle_event(now, Event::SelfCheck(Err(why)));
                    }
                    self.count_conflicts();
                    if let Some(epoch) = self.peer_epoch_unnoted {
                        self.note_peer_epoch(epoch);
                    }
                    self.report_catch_up();
                    self.report_replica_fill();
                    for line in self.engine.take_alarms() {
                        push_bounded(&mut self.alarms, line);
                    }
                }
                _ = async {
                    match watchdog.as_mut() {
                        Some(w) => w.tick().await,
                        None => std::future::pending().await,
                    }
                } => self.systemd.watchdog(),
                _ = async {
                    match term.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending().await,
                    }
                } => break,
                _ = async {
                    match int.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending().await,
                    }
                } => break,
                _ = async {
                    match shutdown.as_mut() {
                        // A dropped handle stops the node too.
                        Some(rx) => { let _ = rx.await; }
                        None => std::future::pending().await,
                    }
                } => break,
            }
        }
        self.systemd.stopping();
        info!(role = %self.core.role(), epoch = self.core.epoch(), "hasync stopping");
        if let Some(v) = &self.vips {
            let _ = tokio::time::timeout(Duration::from_secs(5), v.release()).await;
        }
        if self.core.role() == Role::Primary {
            // A primary that stops stops serving: the MTA goes down with it.
            let env = self.hook_env(Role::Primary, "shutdown", "hasync stopping".into());
            if let Some(run) = self.roles.run_now(roles::HookKind::OnSecondary, env).await {
                self.roles.record(run);
            }
        }
        // The control and metrics threads sit in accept(): let them see
        // that the node is gone (an embedder may start another node on the
        // same ports in this process).
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket_path);
        if let Some(m) = self.cfg.metrics_listen {
            let to = if m.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), m.port())
            } else {
                m
            };
            let _ = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200));
        }
        let _ = std::fs::remove_file(&self.socket_path);
        Ok(())
    }

    /// Every heartbeat path, the main one first.
    fn path_status(&self, now: Instant) -> Vec<control::PathStatus> {
        let window = self.cfg.detection_time();
        std::iter::once((self.cfg.link.listen, self.cfg.link.peer, &self.link))
            .chain(self.paths.iter().map(|(p, ctx, _)| (p.listen, p.peer, ctx)))
            .map(|(listen, peer, ctx)| {
                let age = ctx
                    .stats
                    .last_received
                    .get()
                    .map(|t| now.saturating_duration_since(t));
                control::PathStatus {
                    listen: listen.to_string(),
                    peer: peer.to_string(),
                    up: age.is_some_and(|a| a <= window),
                    outbound_connected: ctx.stats.outbound_connected.get(),
                    heartbeats_received: ctx.stats.heartbeats_received.get(),
                    last_heartbeat_age_ms: age.map(|a| a.as_millis() as u64),
                }
            })
            .collect()
    }

    /// The service addresses: held only while primary (a demotion releases
    /// them at once; this also catches an acquisition that raced one), and
    /// their errors alarmed once each.
    fn watch_vips(&mut self) {
        let Some(v) = &self.vips else { return };
        let st = v.status.lock().expect("vip status").clone();
        if st.held && self.core.role() != Role::Primary {
            v.release_in_background();
        }
        if st.last_error != self.vip_alarmed {
            if let Some(e) = &st.last_error {
                let line = format!("service addresses: {e}");
                warn!(alarm = true, "ALARM: {line}");
                push_bounded(&mut self.alarms, line);
            }
            self.vip_alarmed = st.last_error;
        }
    }

    /// With more than one heartbeat path: a path silent while another
    /// still carries heartbeats is an alarm (not a failover); its return
    /// is logged.
    fn watch_paths(&mut self) {
        if self.paths.is_empty() {
            return;
        }
        let now = Instant::now();
        let status = self.path_status(now);
        if !status.iter().any(|p| p.up) {
            return; // The peer is silent on every path: the core decides.
        }
        let mut main_alarmed = self.main_path_alarmed;
        let mut flags: Vec<&mut bool> = std::iter::once(&mut main_alarmed)
            .chain(self.paths.iter_mut().map(|(_, _, a)| a))
            .collect();
        let mut lines = Vec::new();
        for (p, alarmed) in status.iter().zip(flags.iter_mut()) {
            if !p.up && !**alarmed {
                **alarmed = true;
                lines.push((true, format!(
                    "heartbeat path {} -> {} is down (no heartbeat for {}); the peer is still heard on another path",
                    p.listen,
                    p.peer,
                    p.last_heartbeat_age_ms.map_or("ever".to_string(), |ms| format!("{ms} ms"))
                )));
            } else if p.up && **alarmed {
                **alarmed = false;
                lines.push((
                    false,
                    format!("heartbeat path {} -> {} is up again", p.listen, p.peer),
                ));
            }
        }
        drop(flags);
        self.main_path_alarmed = main_alarmed;
        for (alarm, line) in lines {
            if alarm {
                warn!(alarm = true, "ALARM: {line}");
                push_bounded(&mut self.alarms, line);
            } else {
                info!("{line}");
            }
        }
    }

    #[cfg(feature = "etcd")]
    fn on_lease(&mut self, ev: LeaseMsg) {
        use crate::lease::LeaseEvent;
        let now = Instant::now();
        let ev = match ev {
            LeaseEvent::Acquired {
                valid_until,
                revision,
            } => {
                info!(revision, "primary lease held (fencing revision {revision})");
                Event::LeaseAcquired {
                    valid_until,
                    revision,
                }
            }
            LeaseEvent::Renewed { valid_until } => Event::LeaseRenewed { valid_until },
            LeaseEvent::Refused(why) => Event::LeaseRefused(why),
            LeaseEvent::Lost(why) => Event::LeaseLost(why),
        };
        self.core.handle_event(now, ev);
    }

    #[cfg(not(feature = "etcd"))]
    fn on_lease(&mut self, ev: LeaseMsg) {
        match ev {}
    }

    fn hook_env(&self, role: Role, event: &'static str, reason: String) -> roles::HookEnv {
        roles::HookEnv {
            node: self.cfg.node_name.clone(),
            peer: self.cfg.link.peer_name.clone(),
            role: role.to_string(),
            previous_role: self.prev_role.to_string(),
            epoch: self.core.epoch(),
            reason,
            event,
        }
    }

    fn on_role_msg(&mut self, msg: roles::RoleMsg) {
        let now = Instant::now();
        match msg {
            roles::RoleMsg::Ran { run, kind } => {
                if !run.ok {
                    let line = format!("{} hook failed: {}", kind.key(), run.summary);
                    warn!(alarm = true, "ALARM: {line}");
                    push_bounded(&mut self.alarms, line);
                    if kind == roles::HookKind::OnPrimary
                        && self.roles.config().on_primary_failure
                            == crate::config::HookFailure::StepDown
                        && self.core.role() == Role::Primary
                        && run.epoch == self.core.epoch()
                    {
                        let why = format!("on_primary hook failed ({})", run.summary);
                        if self.core.step_down(now, why).is_ok() {
                            if self.core.role() == Role::Off {
                                warn!("stepped down: hooks.on_primary_failure = \"step-down\"; `hasync join` brings the node back");
                            } else {
                                warn!("stepping down: hooks.on_primary_failure = \"step-down\"; the role goes to the peer first, as in a switchover, then this node goes off (`hasync join` brings it back)");
                            }
                        }
                    }
                }
                self.roles.record(run);
            }
            roles::RoleMsg::Prepared { id, res } if id != self.prepare_id => {
                // A preparation the core gave up on before it ended (its
                // time ran out): another one is asked for, or none.
                debug!(
                    id,
                    current = self.prepare_id,
                    ok = res.is_ok(),
                    "an earlier switchover preparation ended"
                );
            }
            roles::RoleMsg::Prepared { res: Ok(()), .. } => {
                self.core.handle_event(now, Event::HandoverPrepared);
            }
            roles::RoleMsg::Prepared { res: Err(why), .. } => {
                self.core
                    .handle_event(now, Event::HandoverPrepareFailed(why));
            }
        }
    }

    /// An epoch `node` advertised (or this node's record holds): one the
    /// peer took raises what it is known to have served at.
    fn note_epoch_heard(&mut self, node: &str, epoch: u64) {
        if node == self.cfg.link.peer_name
            && crate::failover::epoch_taken_by(&self.cfg.link.peer_name, &self.cfg.node_name, epoch)
            && epoch > self.peer_epoch_known
        {
            self.peer_epoch_known = epoch;
            self.note_peer_epoch(epoch);
        }
    }

    /// Keeps the peer's epoch across a restart (a promotion before the next
    /// heartbeat takes its floor from it), on the chores thread; tried
    /// again at the next tick when it is busy. Not flushed: a machine crash
    /// that loses it only makes the next carried record count for fewer
    /// peers (conflicts kept aside, never deleted).
    fn note_peer_epoch(&mut self, epoch: u64) {
        let (dir, peer) = (self.cfg.state_dir.clone(), self.cfg.link.peer_name.clone());
        let queued = self.chores.run(move || {
            if let Err(e) = write_peer_epoch(&dir, &peer, epoch) {
                warn!("cannot note the peer's epoch {epoch}: {e}");
            }
        });
        self.peer_epoch_unnoted = queued.is_err().then_some(epoch);
    }

    fn execute_actions(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::SendHeartbeat(hb) => {
                    self.heartbeat_tx.send_replace(Some(hb));
                }
                Action::PersistEpoch(rec) => {
                    // The worker lives as long as the node; a closed channel
                    // means it panicked, and then no epoch can be made durable.
                    if self.persist_tx.send(rec).is_err() {
                        self.core.handle_event(
                            Instant::now(),
                            Event::PersistFailed("persist worker is gone".into()),
                        );
                    }
                }
                Action::Become {
                    role,
                    epoch,
                    reason,
                } => {
                    let line = format!("now {role} at epoch {epoch}: {reason}");
                    match role {
                        Role::Failed => error!(role = %role, epoch, "{line}"),
                        _ => info!(role = %role, epoch, "{line}"),
                    }
                    self.systemd.status(&line);
                    // An embedder hears "primary" when on_primary would run
                    // (epoch durable, queue replica promoted, tenure
                    // prepared, addresses up); anything else at once.
                    let change = RoleChange {
                        role,
                        epoch,
                        reason: reason.to_string(),
                    };
                    if role != Role::Primary {
                        self.publish_role(change.clone());
                    }
                    push_bounded(&mut self.transitions, line);
                    self.serving_primary
                        .store(role == Role::Primary, std::sync::atomic::Ordering::Release);
                    let promoted = (role == Role::Primary
                        && self.cfg.queue.sync != crate::config::QueueSync::Off)
                        .then(|| self.engine.promote_queue_replica());
                    if role == Role::Primary {
                        // The peer's last tenure known before this one.
                        self.engine
                            .promoting_from(self.peer_epoch_known.min(epoch.saturating_sub(1)));
                    }
                    self.tenure = self.engine.set_mode(
                        match role {
                            Role::Primary => EngineMode::Primary,
                            Role::Secondary => EngineMode::Secondary,
                            _ => EngineMode::Idle,
                        },
                        epoch,
                    );
                    if role != Role::Secondary {
                        self.catch_up_reported = false;
                    }
                    let env = self.hook_env(role, "role-change", reason.to_string());
                    match role {
                        Role::Primary => {
                            let prepared = self.engine.primary_prepared(self.tenure);
                            let embed = self.roles_tx.clone();
                            self.roles.on_primary(env, async move {
                                if let Some(p) = promoted {
                                    let _ = p.await;
                                }
                                let ready = prepared.await;
                                if let (true, Some(tx)) = (ready, embed) {
                                    tx.send_replace(change);
                                }
                                ready
                            });
                        }
                        Role::Secondary if self.stopped_for_handover => {}
                        Role::Secondary => self.roles.run(roles::HookKind::OnSecondary, env),
                        Role::Failed => self.roles.run(roles::HookKind::OnFailed, env),
                        Role::Off => self.roles.run(roles::HookKind::OnOff, env),
                        _ => {}
                    }
                    if role != Role::HandingOver {
                        self.stopped_for_handover = false;
                    }
                    if role != Role::Primary && self.prev_role == Role::Primary {
                        if let Some(v) = &self.vips {
                            v.release_in_background();
                        }
                    }
                    self.prev_role = role;
                }
                Action::StartQueuePush { peer_epoch } => {
                    self.push_requested += 1;
                    self.push_last = Some((unix_ms(SystemTime::now()), peer_epoch));
                    warn!(
                        peer_epoch,
                        "queue push requested: this node served as primary before and must hand its queued mail to the primary at epoch {peer_epoch}"
                    );
                    self.engine.push_queue(peer_epoch);
                }
                Action::PrepareHandover => {
                    self.stopped_for_handover = true;
                    self.publish_role(RoleChange {
                        role: Role::HandingOver,
                        epoch: self.core.epoch(),
                        reason: "switchover: stop serving; the peer takes over once replication has drained"
                            .into(),
                    });
                    let env = self.hook_env(
                        Role::Secondary,
                        "switchover",
                        "switchover: this node hands over".into(),
                    );
                    let drain = self.engine.drain_handle();
                    self.prepare_id += 1;
                    self.roles
                        .prepare_handover(env, self.prepare_id, move || drain.request());
                }
                Action::AcquireLease =>
                {
                    #[cfg(feature = "etcd")]
                    if let Some(l) = &self.lease {
                        l.acquire();
                    }
                }
                Action::ReleaseLease =>
                {
                    #[cfg(feature = "etcd")]
                    if let Some(l) = &self.lease {
                        l.release();
                    }
                }
                Action::ResumeService { why } => {
                    self.stopped_for_handover = false;
                    self.publish_role(RoleChange {
                        role: Role::Primary,
                        epoch: self.core.epoch(),
                        reason: why.clone(),
                    });
                    let env = self.hook_env(Role::Primary, "resume", why);
                    self.roles.on_primary(env, std::future::ready(true));
                }
                Action::Alarm(alarm) => {
                    let line = alarm.to_string();
                    warn!(alarm = true, "ALARM: {line}");
                    push_bounded(&mut self.alarms, line);
                }
            }
        }
    }

    fn publish_role(&self, change: RoleChange) {
        if let Some(tx) = &self.roles_tx {
            tx.send_replace(change);
        }
    }

    /// What a switchover now would leave behind, if anything.
    fn switchover_blocker(&self, r: &crate::replica::stats::ReplStatus) -> Option<String> {
        match self.core.role() {
            Role::Primary => {
                if !r.connected {
                    return Some(
                        "the sync session to the secondary is down: changes since it dropped are not on the peer".into(),
                    );
                }
                if let Some(p) = &r.progress {
                    return Some(format!(
                        "the replica is being {} ({} of {} files, {:.1} of {:.1} MB)",
                        if r.phase == "initial-sync" {
                            "filled"
                        } else {
                            "verified"
                        },
                        p.files_done,
                        p.files_total,
                        p.bytes_done as f64 / 1e6,
                        p.bytes_total as f64 / 1e6
                    ));
                }
                let backlog = r.ops_pending + r.ops_inflight;
                (backlog > SWITCHOVER_BACKLOG_MAX).then(|| {
                    format!(
                        "{backlog} changes are queued for the secondary (more than {SWITCHOVER_BACKLOG_MAX})"
                    )
                })
            }
            Role::Secondary => {
                if let Some(ms) = r.flush_overdue_ms {
                    Some(format!(
                        "this replica's flush has not returned for {} s (a hung disk?): nothing is acknowledged until it does",
                        ms / 1000
                    ))
                } else if let Some(why) = &r.replica_unverified {
                    Some(format!(
                        "this replica is unverified ({why}) until the primary's next session re-reads it"
                    ))
                } else if !r.connected {
                    Some("no sync session from the primary: this replica may be behind".into())
                } else if !r.caught_up {
                    Some("this replica has not caught up with the primary yet".into())
                } else {
                    None
                }
            }
            // The core refuses these with its own reason.
            _ => None,
        }
    }

    fn handle_request(&mut self, req: Request) -> Response {
        let now = Instant::now();
        let resp = match req {
            Request::Status => {
                // Alarms the replication raised since the last tick belong
                // in this answer already.
                for line in self.engine.take_alarms() {
                    push_bounded(&mut self.alarms, line);
                }
                return Response {
                    ok: true,
                    error: None,
                    message: None,
                    status: Some(self.status(now)),
                    conflicts: None,
                };
            }
            // They read the disk: `handle_control` hands them to the
            // chores thread.
            Request::Conflicts | Request::RestoreConflicts { .. } => {
                Response::error("conflicts are handled off the loop")
            }
            Request::Failover { force } => {
                // Without a live peer the core refuses, with its own reason.
                let blocker = (!force && self.core.status().peer_alive)
                    .then(|| self.switchover_blocker(&self.engine.status()))
                    .flatten();
                if let Some(why) = blocker {
                    return Response::error(format!(
                        "{NOT_SAFE}{why}; `hasync failover --wait` waits for it, `--force` switches over anyway"
                    ));
                }
                match self.core.request_switchover(now) {
                    Ok(()) => {
                        info!("operator requested switchover");
                        Response::message(format!(
                            "switchover started from {} at epoch {}",
                            self.core.role(),
                            self.core.epoch()
                        ))
                    }
                    Err(e) => Response::error(format!("switchover refused: {e}")),
                }
            }
            Request::Notify { path } => match self.engine.notify(&path) {
                Ok(()) => Response::message(format!("{} queued for the secondary", path.display())),
                Err(e) => Response::error(format!("notify refused: {e}")),
            },
            Request::PushQueue => {
                if self.core.role() == Role::Secondary {
                    self.engine.push_queue(self.core.epoch());
                    Response::message("queue push started: see `hasync status` for progress")
                } else {
                    Response::error(format!(
                        "push-queue refused: this node is {}; only a secondary pushes its queue to the primary",
                        self.core.role()
                    ))
                }
            }
            Request::Commit { .. } => Response::error("commit is handled asynchronously"),
            Request::Resync => {
                self.engine.request_resync();
                Response::message(match self.core.role() {
                    Role::Primary => "full verification requested: every file is re-hashed on both nodes",
                    _ => "full verification requested; it runs when this node is primary with a connected secondary",
                })
            }
            Request::Join => match self.core.join(now) {
                Ok(()) => Response::message("rejoining the pair"),
                Err(e) => Response::error(format!("join refused: {e}")),
            },
            // It writes the mark: `handle_control` hands it to the chores
            // thread.
            Request::AcceptReplica { .. } => {
                Response::error("accept-replica is handled off the loop")
            }
        };
        self.execute_actions();
        resp
    }

    /// A control request: those that read the disk go to the chores
    /// thread and answer from there; the rest are answered here.
    fn handle_control(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let stores = self.store_dirs.clone();
        if matches!(
            req,
            Request::Conflicts | Request::RestoreConflicts { .. } | Request::AcceptReplica { .. }
        ) {
            if let Some(busy) = self.chores.busy() {
                let _ = reply.send(Response::error(busy.to_string()));
                return;
            }
        }
        let queued = match req {
            Request::Conflicts => self.chores.run(move || {
                let resp = match list_conflicts(&stores) {
                    Ok(list) => Response {
                        ok: true,
                        error: None,
                        message: None,
                        status: None,
                        conflicts: Some(list),
                    },
                    Err(e) => Response::error(e),
                };
                let _ = reply.send(resp);
            }),
            Request::RestoreConflicts { id } => {
                // Where the users are: only on the primary (a secondary
                // hands the versions it kept aside to the primary).
                if self.core.role() != Role::Primary {
                    let _ = reply.send(Response::error(format!(
                        "restore refused: this node is {}; conflicts are restored on the primary (a secondary hands the versions it kept aside to the primary when they connect)",
                        self.core.role()
                    )));
                    return;
                }
                let serving = self.serving_primary.clone();
                self.chores.run(move || {
                    let _ = reply.send(restore_conflicts(&stores, id.as_deref(), &serving));
                })
            }
            Request::AcceptReplica { force } => {
                use crate::failover::ReplicaFill;
                let cs = self.core.status();
                let peer_serves =
                    cs.peer_alive && matches!(cs.peer_role, Some(Role::Primary | Role::Promoting));
                let refused = match (self.engine.replica_fill(), force) {
                    (ReplicaFill::Complete, _) => Some("this node's replica is not incomplete"),
                    (ReplicaFill::Fresh, false) => Some(
                        "this node never held the mail as far as it knows (a fresh or replaced node); `--force` if its stores do hold it",
                    ),
                    (ReplicaFill::Filling, false) if peer_serves => Some(
                        "the primary is alive and this replica's first sync goes on; `--force` accepts it as it is anyway",
                    ),
                    _ => None,
                };
                if let Some(why) = refused {
                    let _ = reply.send(Response::error(format!("accept-replica refused: {why}")));
                    return;
                }
                // Marked durably there; the core hears of it before the
                // loop's next event (`report_replica_fill`).
                let accept = self.engine.replica_acceptor();
                self.chores.run(move || {
                    let resp = match accept() {
                        Ok(()) => {
                            warn!(alarm = true, "ALARM: the operator accepted this node's incomplete replica as complete: it may take over with the mail it holds (what only the peer holds is kept aside as conflicts once the peer returns)");
                            Response::message(
                                "replica accepted as complete: this node may take over now with the mail it holds",
                            )
                        }
                        Err(e) => Response::error(format!(
                            "accept-replica failed: cannot write the replica fill mark: {e}"
                        )),
                    };
                    let _ = reply.send(resp);
                })
            }
            other => {
                let resp = self.handle_request(other);
                let _ = reply.send(resp);
                return;
            }
        };
        if let Err(busy) = queued {
            // Not reached (room was checked above); the requester would see
            // its connection closed without an answer.
            warn!("control request refused: {busy}");
        }
    }

    /// Counts the versions kept aside, off the loop, one count at a time
    /// and at most every [`CONFLICTS_RECOUNT`]; `hasync status` shows the
    /// last count.
    fn count_conflicts(&mut self) {
        {
            let mut seen = self.conflicts_seen.lock().expect("conflicts lock");
            let recent = seen
                .done_at
                .is_some_and(|t| t.elapsed() < CONFLICTS_RECOUNT);
            if seen.counting || recent {
                return;
            }
            seen.counting = true;
        }
        let (stores, seen) = (self.store_dirs.clone(), self.conflicts_seen.clone());
        let queued = self.chores.run(move || {
            let counted = count_conflicts(&stores);
            let mut seen = seen.lock().expect("conflicts lock");
            match counted {
                Ok((count, oldest)) => (seen.count, seen.oldest) = (count, oldest),
                Err(e) => debug!("{e}"),
            }
            // The next count waits from the end of this one.
            seen.done_at = Some(Instant::now());
            seen.counting = false;
        });
        if queued.is_err() {
            self.conflicts_seen.lock().expect("conflicts lock").counting = false;
        }
    }

    fn on_push_done(&mut self, res: PushOutcome) {
        let res = match res {
            PushOutcome::Cancelled(why) => {
                // Nothing to retry: the push no longer applies.
                info!("queue push cancelled: {why}");
                self.core
                    .handle_event(Instant::now(), Event::QueuePushCancelled);
                return;
            }
            PushOutcome::Done(r) => Ok(r),
            PushOutcome::Failed(e) if self.core.role() != Role::Secondary => {
                // It failed because the peer went away and this node has
                // since become (or is becoming) primary: nothing to retry.
                info!(
                    "queue push cancelled: this node is {} now (last attempt: {e})",
                    self.core.role()
                );
                self.core
                    .handle_event(Instant::now(), Event::QueuePushCancelled);
                return;
            }
            PushOutcome::Failed(e) => Err(e),
        };
        match res {
            Ok(r) if r.failed == 0 => {
                info!(
                    messages = r.messages,
                    ingested = r.ingested,
                    duplicates = r.duplicates_dropped,
                    "queue push complete: {} messages handed to the primary ({} ingested, {} duplicates dropped, {} left in place as garbage)",
                    r.messages, r.ingested, r.duplicates_dropped, r.garbage.len()
                );
                if !r.garbage.is_empty() {
                    push_bounded(
                        &mut self.alarms,
                        format!(
                            "queue push left {} unpushable files in place: {}",
                            r.garbage.len(),
                            r.garbage.join("; ")
                        ),
                    );
                }
                if r.hook_ok == Some(false) {
                    push_bounded(
                        &mut self.alarms,
                        "post-ingest hook failed on the primary".to_string(),
                    );
                }
                self.core.handle_event(Instant::now(), Event::QueuePushDone);
            }
            Ok(r) => {
                let line = format!("queue push incomplete: {} of {} messages refused by the primary and left in place; retry with `hasync push-queue`", r.failed, r.messages);
                warn!(alarm = true, "ALARM: {line}");
                push_bounded(&mut self.alarms, line);
            }
            Err(e) => {
                let line = format!("queue push failed: {e}; retry with `hasync push-queue`");
                warn!(alarm = true, "ALARM: {line}");
                push_bounded(&mut self.alarms, line);
            }
        }
    }

    /// Restore-role waits for the replica to be complete: tell the core once
    /// the primary has said so on the sync connection.
    fn report_catch_up(&mut self) {
        if self.core.role() == Role::Secondary
            && !self.catch_up_reported
            && self.engine.status().caught_up
        {
            self.catch_up_reported = true;
            self.core.handle_event(Instant::now(), Event::CatchUpDone);
        }
    }

    /// Tells the core what this node's stores hold, on every change (the
    /// receiver marks a first fill and its end; a promotion or `hasync
    /// accept-replica` completes it): before every event of the loop, so
    /// that no timer or heartbeat is decided on an old view.
    fn report_replica_fill(&mut self) {
        let fill = self.engine.replica_fill();
        if self.replica_fill_told != Some(fill) {
            self.replica_fill_told = Some(fill);
            self.core.handle_event(Instant::now(), Event::Replica(fill));
        }
    }

    fn status(&self, now: Instant) -> Status {
        let cs = self.core.status();
        let since = self.started.1 + cs.since.saturating_duration_since(self.started.0);
        let stats = &self.link.stats;
        let gaps = stats.gaps_us.borrow();
        let gap = |q: f64| (!gaps.is_empty()).then(|| gaps.value_at_quantile(q) as f64 / 1000.0);
        let replication = self.engine.status();
        let switchover_blocker = self.switchover_blocker(&replication);
        Status {
            node: self.cfg.node_name.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode: cs.role,
            epoch: cs.epoch,
            since_unix_ms: unix_ms(since),
            in_mode_ms: now.saturating_duration_since(cs.since).as_millis() as u64,
            reason: cs.last_reason.to_string(),
            peer: PeerStatus {
                name: self.cfg.link.peer_name.clone(),
                address: self.cfg.link.peer.to_string(),
                seen: cs.peer_last_heard.is_some(),
                alive: cs.peer_alive,
                role: cs.peer_role,
                epoch: cs.peer_epoch,
                last_heartbeat_age_ms: cs
                    .peer_last_heard
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            },
            link: LinkStatus {
                outbound_connected: stats.outbound_connected.get(),
                inbound_connections: stats.inbound_connections.get(),
                auth_failures: stats.auth_failures.get(),
                frame_errors: stats.frame_errors.get(),
                heartbeats_sent: stats.heartbeats_sent.get(),
                heartbeats_received: stats.heartbeats_received.get(),
                heartbeat_interval_ms: self.cfg.link.heartbeat_interval.as_millis() as u64,
                heartbeat_gap_ms_p50: gap(0.5),
                heartbeat_gap_ms_p99: gap(0.99),
                heartbeat_gap_ms_max: (!gaps.is_empty()).then(|| gaps.max() as f64 / 1000.0),
                heartbeat_port: self.gate_stats.snapshot(),
                paths: self.path_status(now),
                heartbeat_gap: Some(crate::daemon::metrics::HistSnapshot::from_micros(&gaps)),
            },
            queue_push: QueuePushStatus {
                running: self
                    .engine
                    .queue
                    .running
                    .load(std::sync::atomic::Ordering::Relaxed),
                last: self
                    .engine
                    .queue
                    .report
                    .lock()
                    .expect("queue report lock")
                    .clone(),
                last_error: self
                    .engine
                    .queue
                    .last_error
                    .lock()
                    .expect("queue error lock")
                    .clone(),
                ingest: self
                    .engine
                    .queue
                    .ingest
                    .lock()
                    .expect("ingest lock")
                    .clone(),
                requested: self.push_requested,
                pending: cs.queue_push_pending,
                last_requested_unix_ms: self.push_last.map(|p| p.0),
                last_target_epoch: self.push_last.map(|p| p.1),
            },
            restore_pending: cs.restore_pending,
            conflicts: {
                // As last counted off the loop (every self-check tick).
                let (count, oldest) = {
                    let seen = self.conflicts_seen.lock().expect("conflicts lock");
                    (seen.count, seen.oldest)
                };
                let now_s = unix_ms(SystemTime::now()) / 1000;
                control::ConflictsStatus {
                    count,
                    oldest_age_s: oldest.map(|t| now_s.saturating_sub(t.max(0) as u64)),
                }
            },
            replication,
            hooks: control::HooksStatus {
                configured: [
                    ("on_primary", &self.cfg.hooks.on_primary),
                    ("on_secondary", &self.cfg.hooks.on_secondary),
                    ("on_failed", &self.cfg.hooks.on_failed),
                    ("on_off", &self.cfg.hooks.on_off),
                ]
                .into_iter()
                .filter(|(_, h)| h.is_some())
                .map(|(k, _)| k.to_string())
                .collect(),
                last: self.roles.last.iter().cloned().collect(),
                switchover_preparing: cs.handover_preparing,
            },
            quorum: match &self.prober {
                Some(p) => p.status.lock().expect("quorum status lock").clone(),
                None => crate::quorum::QuorumStatus {
                    mode: "none".into(),
                    ..Default::default()
                },
            },
            #[cfg(feature = "etcd")]
            lease: self.lease.as_ref().map(|l| {
                l.refresh_status();
                l.status.lock().expect("lease status").clone()
            }),
            vip: self
                .vips
                .as_ref()
                .map(|v| v.status.lock().expect("vip status").clone())
                .unwrap_or_default(),
            alarms: self.alarms.iter().cloned().collect(),
            transitions: self.transitions.iter().cloned().collect(),
            switchover_blocker,
        }
    }
}

/// The node's own health: the directories it needs are there and usable.
/// The versions kept aside as last counted on the chores thread.
#[derive(Debug, Default)]
struct ConflictsSeen {
    count: u64,
    /// When the oldest was kept (unix seconds).
    oldest: Option<i64>,
    /// A count is queued or running.
    counting: bool,
    /// When the last count ended.
    done_at: Option<Instant>,
}

/// A store's name, live root and internal directory.
struct StoreDirs {
    name: String,
    root: PathBuf,
    internal: PathBuf,
}

/// Every version kept aside on this node, oldest first (on the chores
/// thread: it reads the disk).
fn list_conflicts(
    stores: &[StoreDirs],
) -> Result<Vec<crate::replica::conflicts::Conflict>, String> {
    let mut all = Vec::new();
    for st in stores {
        let list = crate::replica::conflicts::list(&st.name, &st.internal)
            .map_err(|e| format!("listing {}: {e}", st.internal.display()))?;
        all.extend(list);
    }
    all.sort_by(|a, b| (a.kept_at, &a.id).cmp(&(b.kept_at, &b.id)));
    Ok(all)
}

/// How many versions are kept aside on this node, and when the oldest was
/// (unix seconds); on the chores thread.
fn count_conflicts(stores: &[StoreDirs]) -> Result<(u64, Option<i64>), String> {
    let mut count = 0;
    let mut oldest: Option<i64> = None;
    for st in stores {
        let (n, o) = crate::replica::conflicts::summary(&st.internal)
            .map_err(|e| format!("counting {}: {e}", st.internal.display()))?;
        count += n;
        oldest = match (oldest, o) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((count, oldest))
}

/// Puts kept versions back into the live tree as new files, while this
/// node serves as primary (`serving`: checked before each, as the role may
/// change while the chores thread works); on the chores thread.
fn restore_conflicts(
    stores: &[StoreDirs],
    id: Option<&str>,
    serving: &std::sync::atomic::AtomicBool,
) -> Response {
    let all = match list_conflicts(stores) {
        Ok(a) => a,
        Err(e) => return Response::error(e),
    };
    let chosen: Vec<_> = match id {
        Some(id) => all.into_iter().filter(|c| c.id == id).collect(),
        None => all,
    };
    if chosen.is_empty() {
        return Response::error(match id {
            Some(id) => format!("no conflict {id:?}: see `hasync conflicts list`"),
            None => "no conflicts to restore".to_string(),
        });
    }
    let mut lines = Vec::new();
    for c in &chosen {
        // On a secondary the primary's next comparison would delete it.
        if !serving.load(std::sync::atomic::Ordering::Acquire) {
            return Response::error(format!(
                "restore stopped: this node no longer serves as primary (restored before: {})",
                lines.len()
            ));
        }
        let Some(st) = stores.iter().find(|s| s.name == c.store) else {
            return Response::error(format!("{}: no store {:?} configured", c.id, c.store));
        };
        match crate::replica::conflicts::restore(c, &st.internal, &st.root) {
            Ok(to) => {
                info!(id = %c.id, to = %to.display(), "conflict restored into the live tree");
                lines.push(format!("restored {} -> {}", c.id, to.display()));
            }
            Err(e) => {
                return Response::error(format!(
                    "restoring {}: {e} (restored before it: {})",
                    c.id,
                    lines.len()
                ))
            }
        }
    }
    Response::message(lines.join("\n"))
}

fn self_check_dirs(cfg: &Config) -> Result<(), String> {
    use rustix::fs::{access, Access};
    let is_dir = |key: &str, p: &Path| match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{key} {} is not a directory", p.display())),
        Err(e) => Err(format!("{key} {}: {e}", p.display())),
    };
    is_dir("state_dir", &cfg.state_dir)?;
    access(&cfg.state_dir, Access::WRITE_OK)
        .map_err(|e| format!("state_dir {} is not writable: {e}", cfg.state_dir.display()))?;
    is_dir("queue_dir", &cfg.queue_dir)?;
    for (name, path) in &cfg.mailstores {
        is_dir(&format!("mailstores.{name}"), path)?;
    }
    Ok(())
}

/// Writes each requested record durably, newest first: records only grow, so
/// when several are queued only the latest needs the disk.
async fn persist_worker(
    dir: PathBuf,
    mut requests: mpsc::UnboundedReceiver<EpochRecord>,
    results: mpsc::UnboundedSender<Result<EpochRecord, String>>,
) {
    // One answer per record, in order, oldest first: the core counts them
    // (records are rare; none is skipped for a newer one).
    while let Some(rec) = requests.recv().await {
        let res = crate::io::write_atomic(&dir, state::EPOCH_FILE, state::encode(&rec))
            .await
            .map(|()| rec)
            .map_err(|e| format!("{}: {e}", dir.join(state::EPOCH_FILE).display()));
        if results.send(res).is_err() {
            return;
        }
    }
}

fn bind_control(path: &Path) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(
                path.parent().unwrap_or(path).to_owned(),
            ));
        }
        // A socket left by a daemon that was killed: nobody answers on it.
        std::fs::remove_file(path).map_err(|source| DaemonError::ControlSocket {
            path: path.to_owned(),
            source,
        })?;
    }
    std::os::unix::net::UnixListener::bind(path).map_err(|source| DaemonError::ControlSocket {
        path: path.to_owned(),
        source,
    })
}

/// Serves the control socket on a plain thread. tokio-uring 0.5 cannot bind
/// unix sockets (it sets SO_REUSEPORT, which AF_UNIX refuses), and operator
/// requests are rare and tiny, so blocking I/O here costs nothing; requests
/// reach the node's loop through a bounded channel.
fn serve_control(
    listener: std::os::unix::net::UnixListener,
    to_node: mpsc::Sender<ControlMsg>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    // Each connection on a thread of its own, a few at once: a request
    // that waits on the disk (a listing on the chores thread) holds up no
    // `hasync status`.
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        if open.load(Relaxed) >= CONTROL_CONNS_MAX {
            answer(
                &stream,
                &Response::error(format!(
                    "the node is busy: {CONTROL_CONNS_MAX} control requests are being answered; try again"
                )),
            );
            continue;
        }
        open.fetch_add(1, Relaxed);
        let (to, done) = (to_node.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("hasync-control-conn".into())
            .spawn(move || {
                control_conn(stream, &to);
                done.fetch_sub(1, Relaxed);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Relaxed);
        }
        if to_node.is_closed() {
            return;
        }
    }
}

fn answer(stream: &std::os::unix::net::UnixStream, resp: &Response) {
    use std::io::Write;
    let mut out = serde_json::to_vec(resp).expect("response serialises");
    out.push(b'\n');
    let _ = (&*stream).write_all(&out);
}

fn control_conn(stream: std::os::unix::net::UnixStream, to_node: &mpsc::Sender<ControlMsg>) {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    let mut reader = std::io::BufReader::new((&stream).take(REQUEST_BYTES_MAX as u64));
    if reader.read_until(b'\n', &mut line).is_err() {
        return;
    }
    let resp = match serde_json::from_slice::<Request>(line.trim_ascii()) {
        Ok(req) => {
            let (tx, mut rx) = oneshot::channel();
            if to_node.blocking_send((req, tx)).is_err() {
                return;
            }
            // Bounded: a request stuck behind a hung disk answers so.
            let until = Instant::now() + CONTROL_REPLY_WAIT;
            loop {
                match rx.try_recv() {
                    Ok(r) => break r,
                    Err(oneshot::error::TryRecvError::Closed) => return,
                    Err(oneshot::error::TryRecvError::Empty) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        break Response::error(format!(
                            "no answer within {} s (the disk behind the request may hang)",
                            CONTROL_REPLY_WAIT.as_secs()
                        ))
                    }
                }
            }
        }
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    answer(&stream, &resp);
}

/// Human rendering of a status snapshot (`hasync status`).
pub fn render_status(s: &Status) -> String {
    use crate::logging::printable;
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node      {} (pid {}, hasync {})",
        s.node, s.pid, s.version
    );
    let _ = writeln!(
        o,
        "mode      {} at epoch {}, for {:.1}s ({})",
        s.mode,
        s.epoch,
        s.in_mode_ms as f64 / 1000.0,
        printable(&s.reason)
    );
    let peer = match (s.peer.alive, s.peer.role, s.peer.last_heartbeat_age_ms) {
        (true, Some(role), Some(age)) => format!(
            "{} at {}: {role} at epoch {}, last heartbeat {age} ms ago",
            s.peer.name,
            s.peer.address,
            s.peer.epoch.unwrap_or_default()
        ),
        (false, Some(role), Some(age)) => format!(
            "{} at {}: LOST (last seen as {role}, {age} ms ago)",
            s.peer.name, s.peer.address
        ),
        _ => format!("{} at {}: never heard", s.peer.name, s.peer.address),
    };
    let _ = writeln!(o, "peer      {peer}");
    let _ = writeln!(
        o,
        "link      out {}, in {}; heartbeats sent {} received {}; gap p99 {} max {} (interval {} ms); auth failures {}",
        if s.link.outbound_connected { "up" } else { "down" },
        s.link.inbound_connections,
        s.link.heartbeats_sent,
        s.link.heartbeats_received,
        fmt_ms(s.link.heartbeat_gap_ms_p99),
        fmt_ms(s.link.heartbeat_gap_ms_max),
        s.link.heartbeat_interval_ms,
        s.link.auth_failures
    );
    let gate = |g: &crate::link::gate::GateStatus| {
        format!(
            "{} refused ({} failed authentication, {} timed out, {} bad frames, {} evicted), {} handshaking now",
            g.refused_total, g.auth_failures, g.handshake_timeouts, g.frame_errors, g.evicted, g.unauthenticated
        )
    };
    let (hp, sp) = (&s.link.heartbeat_port, &s.replication.sync_port);
    if hp.refused_total + sp.refused_total + hp.unauthenticated + sp.unauthenticated > 0 {
        let _ = writeln!(o, "strangers heartbeat port: {}", gate(hp));
        let _ = writeln!(o, "          sync port: {}", gate(sp));
    }
    let q = &s.queue_push;
    if q.requested > 0 || q.running || q.last.messages > 0 {
        let _ = writeln!(
            o,
            "queue     push requested {} time(s){}{}; last: {} messages, {} pushed, {} ingested, {} duplicates dropped, {} failed, {} garbage",
            q.requested,
            if q.pending { ", pending" } else { "" },
            if q.running { ", RUNNING" } else { "" },
            q.last.messages,
            q.last.pushed,
            q.last.ingested,
            q.last.duplicates_dropped,
            q.last.failed,
            q.last.garbage.len()
        );
    }
    if q.ingest.ingested + q.ingest.duplicates_dropped + q.ingest.refused > 0 {
        let _ = writeln!(
            o,
            "ingest    {} ingested, {} duplicates dropped, {} refused, {} IDs replaced; ledger {} entries; hook runs {} (failed {})",
            q.ingest.ingested,
            q.ingest.duplicates_dropped,
            q.ingest.refused,
            q.ingest.renamed_ids,
            q.ingest.ledger_entries,
            q.ingest.hook_runs,
            q.ingest.hook_failures
        );
    }
    if s.replication.commits_replicated + s.replication.commits_degraded > 0 {
        let _ = writeln!(
            o,
            "commit    {}: {} replicated, {} local-only",
            s.replication.commit_mode,
            s.replication.commits_replicated,
            s.replication.commits_degraded
        );
    }
    let r = &s.replication;
    let _ = writeln!(
        o,
        "replica   {} ({}{}): sent {} files / {:.1} MB, {} renames, {} links, {} deletes; acked {} ops, {} in flight, {} pending; lag p99 {}",
        r.mode,
        if r.connected { "connected" } else { "not connected" },
        if r.phase.is_empty() { String::new() } else { format!(", {}", r.phase) },
        r.files_sent,
        r.content_bytes_sent as f64 / 1e6,
        r.renames_sent,
        r.links_sent,
        r.deletes_sent,
        r.ops_acked,
        r.ops_inflight,
        r.ops_pending,
        fmt_ms(r.lag_ms_p99)
    );
    if let Some(p) = &r.progress {
        let _ = writeln!(
            o,
            "progress  {}/{} files, {:.1}/{:.1} MB, {:.0} files/s, ETA {}",
            p.files_done,
            p.files_total,
            p.bytes_done as f64 / 1e6,
            p.bytes_total as f64 / 1e6,
            p.files_per_s,
            p.eta_s.map_or("-".into(), |e| format!("{e:.0}s"))
        );
    }
    let _ = writeln!(
        o,
        "          landed {} files / {:.1} MB; watches {}, inotify overflows {}, rescans {}, repaired {}, conflicts kept {}, refused paths {}{}",
        r.files_landed,
        r.bytes_landed as f64 / 1e6,
        r.watches,
        r.inotify_overflows,
        r.rescans,
        r.repaired,
        r.conflicts_kept,
        r.refused_paths,
        if r.disk_full || r.peer_disk_full { ", DISK FULL: paused" } else { "" }
    );
    if r.unwatched_folders > 0 {
        let _ = writeln!(
            o,
            "          {} FOLDERS NOT WATCHED (inotify watch limit? fs.inotify.max_user_watches): compared with the replica at each retry (30 s, doubling up to 5 min)",
            r.unwatched_folders
        );
    }
    if let Some(secs) = r.tracker_stalled_s {
        let _ = writeln!(
            o,
            "          CHANGE TRACKER STALLED for {secs} s: held deletes, CaughtUp and a switchover's drain wait"
        );
    }
    match &s.switchover_blocker {
        None => {
            let _ = writeln!(
                o,
                "failover  safe now{}",
                match (s.mode, r.last_ack_age_ms) {
                    (Role::Primary, Some(a)) => format!(
                        ": {} changes queued, last durable ack {a} ms ago",
                        r.ops_pending + r.ops_inflight
                    ),
                    (Role::Secondary, _) => ": the replica has caught up".to_string(),
                    _ => String::new(),
                }
            );
        }
        Some(why) => {
            let _ = writeln!(o, "failover  NOT SAFE: {}", printable(why));
        }
    }
    if let Some(ms) = r.flush_overdue_ms {
        let _ = writeln!(
            o,
            "replica   FLUSH OVERDUE: running for {:.1} s (a hung disk?); nothing is acknowledged until it returns",
            ms as f64 / 1000.0
        );
    }
    if r.replica_incomplete {
        let _ = writeln!(
            o,
            "replica   INCOMPLETE: its first sync has not finished; this node does not take over on its own (`hasync accept-replica` to serve with what it holds)"
        );
    }
    if let Some(why) = &r.replica_unverified {
        let _ = writeln!(
            o,
            "replica   UNVERIFIED: {}; re-read from disk at the next session",
            printable(why)
        );
    }
    if r.foreign_watch != "-" || r.foreign_writes > 0 {
        let _ = writeln!(
            o,
            "          foreign-write watch {}, foreign writes {}",
            printable(&r.foreign_watch),
            r.foreign_writes
        );
    }
    if s.conflicts.count > 0 {
        let _ = writeln!(
            o,
            "conflicts {} kept aside, oldest {}s ago: `hasync conflicts list`, then `hasync conflicts restore ID|--all` on the primary",
            s.conflicts.count,
            s.conflicts.oldest_age_s.unwrap_or(0)
        );
    }
    if let Some(why) = r
        .conflict_refused
        .as_ref()
        .filter(|_| s.mode == Role::Secondary)
    {
        let _ = writeln!(o, "conflicts REFUSED BY THE PRIMARY: {}", printable(why));
    }
    if let Some(why) = &r.disk_full_why {
        let _ = writeln!(o, "DISK FULL {}", printable(why));
    }
    if !r.stages_ms.is_empty() {
        let parts: Vec<String> = r
            .stages_ms
            .iter()
            .map(|(k, v)| format!("{k} {:.1}/{:.1}/{:.1}", v.p50, v.p99, v.max))
            .collect();
        let _ = writeln!(o, "stages    p50/p99/max ms: {}", parts.join(", "));
    }
    if r.files_spliced > 0 {
        let _ = writeln!(
            o,
            "zero-copy {} large files / {:.1} MB spliced",
            r.files_spliced,
            r.bytes_spliced as f64 / 1e6
        );
    }
    if let Some(e) = &r.last_error {
        let _ = writeln!(o, "error     {}", printable(e));
    }
    for a in s.alarms.iter().rev().take(5) {
        let _ = writeln!(o, "alarm     {}", printable(&a.message));
    }
    o
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

/// Where the highest of the peer's epochs this node heard of is kept (the
/// floor of a takeover record's carried part; see `replica::takeover`).
pub const PEER_EPOCH_FILE: &str = "peer-epoch";

/// `<peer name> <epoch>`: a file left by another peer (a replaced node, a
/// reused state directory) is not taken for this one's.
fn write_peer_epoch(state_dir: &std::path::Path, peer: &str, epoch: u64) -> std::io::Result<()> {
    let path = state_dir.join(PEER_EPOCH_FILE);
    let tmp = state_dir.join(".peer-epoch.tmp");
    std::fs::write(&tmp, format!("{peer} {epoch}\n"))?;
    std::fs::rename(&tmp, &path)
}

fn read_peer_epoch(state_dir: &std::path::Path, peer: &str) -> Option<u64> {
    let text = std::fs::read_to_string(state_dir.join(PEER_EPOCH_FILE)).ok()?;
    let (name, epoch) = text.trim().rsplit_once(' ')?;
    (name == peer).then(|| epoch.parse().ok()).flatten()
}

#[cfg(test)]
mod peer_epoch_tests {
    use super::*;

    /// A file another peer left (a replaced node, a reused state directory)
    /// is not taken for this peer's epoch.
    #[test]
    fn the_peer_epoch_is_read_only_for_the_peer_that_wrote_it() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_peer_epoch(d.path(), "mx2"), None);
        write_peer_epoch(d.path(), "mx2", 41).unwrap();
        assert_eq!(read_peer_epoch(d.path(), "mx2"), Some(41));
        assert_eq!(read_peer_epoch(d.path(), "mx3"), None);
        std::fs::write(d.path().join(PEER_EPOCH_FILE), "41\n").unwrap();
        assert_eq!(read_peer_epoch(d.path(), "mx2"), None);
    }
}
