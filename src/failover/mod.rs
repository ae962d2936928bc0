//! The failover state core: a pure state machine that decides this node's role.
//!
//! It owns no socket, file, clock or thread. The driver feeds it
//! [`Core::handle_event`] / [`Core::handle_timeout`] with the current time and
//! drains [`Core::poll_action`]; [`Core::poll_timeout`] says when to call back.
//! That is what lets `tests/sim` run thousands of seeded failover scenarios per
//! second on a virtual clock.
//!
//! # Epochs
//! Every promotion takes a new *epoch* (a term), persisted durably before the
//! node acts as primary. Epochs are partitioned between the two nodes by
//! parity (the node whose name sorts first owns the odd epochs, the other the
//! even ones), so two primaries can never hold the same epoch, even when both
//! promote during a partition; a split brain therefore always resolves by
//! "higher epoch wins", and the configured tie-break only decides start-up
//! elections.

#[cfg(any(test, feature = "tools"))]
pub mod sim;

/// Parity of the epochs `node` may take in a pair with `peer`: the name
/// that sorts first owns the odd ones (see the module docs).
fn owned_parity(node: &str, peer: &str) -> u64 {
    u64::from(node < peer)
}

/// Is `epoch` one that `node` takes in a pair with `peer` (only that node
/// ever takes it, durably before anyone hears of it)?
pub fn epoch_taken_by(node: &str, peer: &str, epoch: u64) -> bool {
    epoch != 0 && epoch % 2 == owned_parity(node, peer)
}
mod timer;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use timer::{Timer, TimerTable};

/// What a recovered former primary does when it finds a new primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryPolicy {
    /// Join as secondary and push the local queue to the new primary.
    #[default]
    BecomeSecondary,
    /// Join as secondary, push the queue, catch up, then take the primary
    /// role back by a clean switchover.
    RestoreRole,
    /// Stay out of the pair until an operator runs `hasync join`.
    Off,
}

/// How a start-up election between equal priorities is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TieBreak {
    /// The node whose name sorts first wins.
    #[default]
    LowerName,
    /// The node whose name sorts last wins.
    HigherName,
}

/// A node's role, as it advertises it in heartbeats and reports it in status.
///
/// `Primary`, `Secondary`, `Failed` and `Off` are the effective modes of the
/// appliance world; the others are transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Started (or rejoining), waiting to hear the peer before choosing a role.
    Negotiating,
    /// Won the role, waiting for the new epoch to be durable.
    Promoting,
    Primary,
    Secondary,
    /// Was primary, stepped down for a switchover, waiting for the successor.
    HandingOver,
    /// Own checks failed; out of the pair until they pass again.
    Failed,
    /// HA disabled by policy or operator.
    Off,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Negotiating => "negotiating",
            Role::Promoting => "promoting",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::HandingOver => "handing-over",
            Role::Failed => "failed",
            Role::Off => "off",
        }
    }

    /// Wire code of the role (see `wire`).
    pub fn code(self) -> u8 {
        match self {
            Role::Negotiating => 1,
            Role::Promoting => 2,
            Role::Primary => 3,
            Role::Secondary => 4,
            Role::HandingOver => 5,
            Role::Failed => 6,
            Role::Off => 7,
        }
    }

    pub fn from_code(code: u8) -> Option<Role> {
        Some(match code {
            1 => Role::Negotiating,
            2 => Role::Promoting,
            3 => Role::Primary,
            4 => Role::Secondary,
            5 => Role::HandingOver,
            6 => Role::Failed,
            7 => Role::Off,
            _ => return None,
        })
    }

    /// A peer in this role is, or is about to be, serving as primary.
    fn is_live_primary(self) -> bool {
        matches!(self, Role::Primary | Role::Promoting)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Heartbeat flag: the sender (a secondary) asks the primary to hand over.
pub const FLAG_TAKEOVER_REQUEST: u8 = 0b0000_0001;
/// Heartbeat flag: the sender hears its peer (the receiver) now. A primary
/// that serves on without its lease counts only on a peer that hears it.
pub const FLAG_HEARS_PEER: u8 = 0b0000_0010;
/// Heartbeat flag: the sender's replica is being filled for the first time
/// and holds only part of the mail; it does not promote on its own, and
/// loses every election against a peer without the flag.
pub const FLAG_REPLICA_INCOMPLETE: u8 = 0b0000_0100;
/// Heartbeat flag: the sender's stores never held the mail (a new or
/// replaced node whose first sync has not begun). A primary stepping down
/// beside it waits, as beside an incomplete replica.
pub const FLAG_REPLICA_FRESH: u8 = 0b0000_1000;

/// What a node knows of the mail its stores hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaFill {
    /// Never served and never a complete replica: a fresh node (which may
    /// start a pair with the mail it was given), or one whose state was
    /// lost. It may promote, but not over a peer whose replica is
    /// incomplete: that peer may hold mail, this one need not.
    #[default]
    Fresh,
    /// Its first fill from a primary has begun and not finished: it holds
    /// part of the mail, and does not take over on its own.
    Filling,
    /// It served as primary, or its replica was complete once.
    Complete,
}

/// What a heartbeat says about its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub node: String,
    pub role: Role,
    pub epoch: u64,
    pub seq: u64,
    pub priority: u8,
    pub flags: u8,
}

/// The durable part of the core: what must survive a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    /// Highest epoch this node has taken or seen a primary hold.
    pub epoch: u64,
    /// The epoch at which this node last served as primary, until its queue
    /// has been pushed to a successor. `Some` on restart means "I am a former
    /// primary and may hold queued mail".
    pub held_primary: Option<u64>,
}

/// The core's view of its own configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub node_name: String,
    pub peer_name: String,
    pub priority: u8,
    pub heartbeat_interval: Duration,
    pub heartbeat_lost_threshold: u32,
    pub startup_wait: Duration,
    pub recovery: RecoveryPolicy,
    pub tie_break: TieBreak,
    /// Before handing over (a switchover), the primary stops its services
    /// and drains its replication ([`Action::PrepareHandover`]), and hands
    /// over only once that is done ([`Event::HandoverPrepared`]), giving up
    /// after this long. `None`: hand over at once (nothing to prepare).
    pub prepare_handover: Option<Duration>,
    /// The third vote: what a node needs besides a silent peer to promote.
    pub quorum: QuorumRule,
}

/// How a node that does not hear its peer decides (see the README's
/// quorum section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuorumRule {
    /// A silent peer is a dead peer: the secondary promotes. A cut of every
    /// link between the nodes gives two primaries until it heals.
    #[default]
    None,
    /// The driver reports whether this node reaches a majority of its
    /// targets ([`Event::Quorum`]). A node that lost its peer promotes only
    /// with the majority, after `grace` (time for an isolated primary to
    /// step down); a primary that lost both its peer and the majority
    /// steps down (to `negotiating`) at once.
    Ping { grace: Duration },
    /// The primary role is a lease in an etcd cluster: a node promotes only
    /// once it holds the lease ([`Action::AcquireLease`], answered by
    /// [`Event::LeaseAcquired`]); one that lost its peer tries after
    /// `grace`; a primary whose lease will run out within `margin` steps
    /// down unless it still hears its peer. `ttl` is the lease's time to
    /// live in etcd (the driver's; the core goes by what it is told).
    Lease {
        grace: Duration,
        margin: Duration,
        ttl: Duration,
    },
}

impl CoreConfig {
    /// How long without a heartbeat before the peer counts as lost.
    pub fn lost_window(&self) -> Duration {
        self.heartbeat_interval * self.heartbeat_lost_threshold
    }
}

/// Inputs from the driver.
#[derive(Debug, Clone)]
pub enum Event {
    /// A heartbeat arrived from the (authenticated) peer.
    Heartbeat(Heartbeat),
    /// A link to the peer came up: say who we are right away.
    LinkUp,
    /// The driver made this record durable (written, fsynced, renamed, dir fsynced).
    Persisted(EpochRecord),
    /// Persisting failed; the state directory cannot be trusted any more.
    PersistFailed(String),
    /// Result of the driver's periodic self-check.
    SelfCheck(Result<(), String>),
    /// The queue push raised by [`Action::StartQueuePush`] finished.
    QueuePushDone,
    /// That push no longer applies (this node is not secondary any more);
    /// the queue stays here, where it is the live queue.
    QueuePushCancelled,
    /// Mailstore catch-up from the primary finished.
    CatchUpDone,
    /// [`Action::PrepareHandover`] is done: services stopped, every change
    /// durable on the peer. The handover proceeds.
    HandoverPrepared,
    /// [`Action::PrepareHandover`] failed: the switchover is abandoned and
    /// this node keeps serving ([`Action::ResumeService`]).
    HandoverPrepareFailed(String),
    /// Whether this node reaches a majority of its quorum targets (ping
    /// mode); sent on every change.
    Quorum(bool),
    /// Lease mode: this node holds the lease until `valid_until` (unless
    /// renewed); `revision` is the tenure's fencing token.
    LeaseAcquired { valid_until: Instant, revision: i64 },
    /// Lease mode: the lease was renewed.
    LeaseRenewed { valid_until: Instant },
    /// Lease mode: the lease is held by the peer, or etcd is unreachable.
    LeaseRefused(String),
    /// Lease mode: etcd says the lease is gone.
    LeaseLost(String),
    /// What this node's stores hold (see [`ReplicaFill`]): sent at start
    /// (from the durable marks) and on every change. An incomplete node
    /// does not promote on its own (a silent peer, a peer failed or off,
    /// no peer at start-up); it takes over only in a switchover, or once
    /// complete or accepted by the operator. Only a complete node takes
    /// over from an incomplete one.
    Replica(ReplicaFill),
}

/// Why the core did something; printed in the log line of every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Started,
    NoPeerAtStartup {
        waited: Duration,
    },
    PeerIsPrimary {
        peer_epoch: u64,
    },
    WonElection {
        peer_priority: u8,
    },
    PeerLost {
        silent_for: Duration,
    },
    PeerRole(Role),
    SplitBrainLost {
        our_epoch: u64,
        peer_epoch: u64,
    },
    SwitchoverRequested,
    TakeoverRequestedByPeer,
    HandoverComplete {
        peer_epoch: u64,
    },
    HandoverTimedOut,
    EpochDurable,
    SelfCheckFailed(String),
    SelfCheckPassed,
    PersistFailed(String),
    RecoveryPolicyOff,
    OperatorJoin,
    PersistRecovered,
    /// The driver took the node out of service (a failed `on_primary`
    /// hook with `on_primary_failure = "step-down"`).
    SteppedDown(String),
    /// Neither the peer nor a majority of the quorum targets is reachable:
    /// this node may be the isolated one.
    Isolated,
    /// The peer is silent and the quorum targets are reachable: the peer
    /// is down, or cut off.
    PeerLostWithQuorum,
    /// Lease mode: the lease runs out (etcd unreachable) and the peer is
    /// silent: the peer may take the lease.
    LeaseLost(String),
    /// The replica is complete now, or the operator accepted it as it is
    /// (`hasync accept-replica`), and no primary is heard.
    ReplicaAccepted,
    /// The peer's replica is incomplete and no primary serves: this node
    /// holds the mail (it served, or its replica is complete).
    PeerReplicaIncomplete,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Started => write!(f, "node started"),
            Reason::SteppedDown(why) => write!(f, "stepped down: {why}"),
            Reason::Isolated => write!(
                f,
                "isolated: neither the peer nor a majority of the quorum targets is reachable"
            ),
            Reason::LeaseLost(why) => write!(f, "primary lease lost: {why}"),
            Reason::ReplicaAccepted => write!(
                f,
                "the replica is complete or accepted, and no primary is heard"
            ),
            Reason::PeerReplicaIncomplete => {
                write!(f, "the peer's replica is incomplete and no primary serves")
            }
            Reason::PeerLostWithQuorum => write!(
                f,
                "peer silent while a majority of the quorum targets is reachable"
            ),
            Reason::NoPeerAtStartup { waited } => {
                write!(f, "no peer heard during start-up wait of {waited:?}")
            }
            Reason::PeerIsPrimary { peer_epoch } => {
                write!(f, "peer is primary at epoch {peer_epoch}")
            }
            Reason::WonElection { peer_priority } => {
                write!(
                    f,
                    "won start-up election against peer priority {peer_priority}"
                )
            }
            Reason::PeerLost { silent_for } => {
                write!(f, "no heartbeat from peer for {silent_for:?}")
            }
            Reason::PeerRole(role) => write!(f, "peer reports role {role}"),
            Reason::SplitBrainLost {
                our_epoch,
                peer_epoch,
            } => write!(
                f,
                "split brain: peer primary at epoch {peer_epoch} wins over our epoch {our_epoch}"
            ),
            Reason::SwitchoverRequested => write!(f, "operator requested switchover"),
            Reason::TakeoverRequestedByPeer => write!(f, "peer requested takeover"),
            Reason::HandoverComplete { peer_epoch } => {
                write!(f, "handover complete, peer primary at epoch {peer_epoch}")
            }
            Reason::HandoverTimedOut => write!(f, "handover not acknowledged in time"),
            Reason::EpochDurable => write!(f, "new epoch is durable"),
            Reason::SelfCheckFailed(why) => write!(f, "self-check failed: {why}"),
            Reason::SelfCheckPassed => write!(f, "self-check passes again"),
            Reason::PersistFailed(why) => write!(f, "could not persist epoch: {why}"),
            Reason::RecoveryPolicyOff => {
                write!(f, "recovered former primary and recovery policy is off")
            }
            Reason::OperatorJoin => write!(f, "operator asked to join the pair"),
            Reason::PersistRecovered => {
                write!(f, "the state directory takes writes again")
            }
        }
    }
}

/// Something an operator should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    SplitBrain {
        our_epoch: u64,
        peer_epoch: u64,
        we_stay_primary: bool,
    },
    PeerLost {
        silent_for: Duration,
    },
    SelfCheckFailed(String),
    PersistFailed(String),
    UnexpectedPeer {
        name: String,
    },
    SwitchoverAbandoned(String),
    /// The peer is silent but this node reaches no majority of its quorum
    /// targets: it does not promote.
    NoQuorum,
    /// Lease mode: the lease cannot be renewed; this primary serves on
    /// because its peer still hears it.
    LeaseUnrenewed(String),
    /// Lease mode: a promotion is waiting for the lease.
    LeaseRefused(String),
    /// No primary serves, and this node does not promote: its replica is
    /// incomplete (a first fill that has not finished).
    ReplicaIncomplete,
    /// No primary serves, the peer's replica is incomplete, and this node
    /// does not take over from it: it never held the mail (fresh).
    FreshBesideIncomplete,
    /// A step-down waits for the peer's first fill: this node stays
    /// primary, replicating, and hands over once the peer holds all the
    /// mail.
    StepDownWaitsForFill(String),
    /// A step-down could not hand the role over: this node goes off.
    StepDownHandoverFailed(String),
}

impl fmt::Display for Alarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alarm::SplitBrain {
                our_epoch,
                peer_epoch,
                we_stay_primary,
            } => write!(
                f,
                "split brain: both nodes primary (ours epoch {our_epoch}, peer epoch {peer_epoch}); {}",
                if *we_stay_primary {
                    "this node stays primary"
                } else {
                    "this node demotes and pushes its queue"
                }
            ),
            Alarm::PeerLost { silent_for } => {
                write!(f, "peer lost: no heartbeat for {silent_for:?}")
            }
            Alarm::SelfCheckFailed(why) => write!(f, "self-check failed: {why}"),
            Alarm::PersistFailed(why) => write!(f, "epoch persistence failed: {why}"),
            Alarm::UnexpectedPeer { name } => {
                write!(f, "heartbeat from unexpected node {name:?} ignored")
            }
            Alarm::LeaseUnrenewed(why) => write!(
                f,
                "the primary lease cannot be renewed ({why}); serving on while the peer hears this node"
            ),
            Alarm::LeaseRefused(why) => write!(f, "not promoting without the primary lease: {why}"),
            Alarm::ReplicaIncomplete => write!(
                f,
                "no primary serves and this node does not promote: its replica is incomplete (its first sync has not finished), the peer holds the mail; start the peer again, or run `hasync accept-replica` here to serve with the mail this node has"
            ),
            Alarm::FreshBesideIncomplete => write!(
                f,
                "no primary serves and this node does not take over: the peer's replica is incomplete (its first sync did not finish) and this node never held the mail (a fresh or replaced node); run `hasync accept-replica` on the peer to serve with the mail it holds, or `hasync accept-replica --force` here if this node's stores do hold the mail"
            ),
            Alarm::NoQuorum => write!(
                f,
                "peer silent and no majority of the quorum targets reachable: not promoting (this node may be the isolated one)"
            ),
            Alarm::SwitchoverAbandoned(why) => {
                write!(f, "switchover abandoned, this node keeps serving: {why}")
            }
            Alarm::StepDownWaitsForFill(why) => write!(
                f,
                "stepping down ({why}): the peer's replica is still filling (its first sync has not finished); this node stays primary, replicating but serving no mail, and hands the role over once the peer holds all the mail"
            ),
            Alarm::StepDownHandoverFailed(why) => write!(
                f,
                "stepping down: handing the role over failed ({why}); this node goes off"
            ),
        }
    }
}

/// Outputs for the driver to execute, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendHeartbeat(Heartbeat),
    /// Make this record durable, then feed back [`Event::Persisted`] (or
    /// [`Event::PersistFailed`]): one answer per record, in order.
    PersistEpoch(EpochRecord),
    /// The node's role changed. Entering `Primary` means "serve mail now";
    /// leaving it means "stop serving now".
    Become {
        role: Role,
        epoch: u64,
        reason: Reason,
    },
    /// Push the local mail queue to the new primary (which holds `peer_epoch`).
    StartQueuePush {
        peer_epoch: u64,
    },
    /// A switchover from this primary: stop serving (the secondary's
    /// hooks) and make every change durable on the peer, then feed back
    /// [`Event::HandoverPrepared`] (or [`Event::HandoverPrepareFailed`]).
    /// The node stays primary meanwhile.
    PrepareHandover,
    /// A prepared handover was abandoned: serve again (the primary's
    /// hooks), at the same epoch.
    ResumeService {
        why: String,
    },
    /// Lease mode: try to take the lease (feed back `LeaseAcquired` or
    /// `LeaseRefused`).
    AcquireLease,
    /// Lease mode: give the lease up.
    ReleaseLease,
    Alarm(Alarm),
}

/// Why an operator command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefused {
    #[error("switchover needs a live peer in role {needed}, but the peer is {peer}")]
    PeerNotReady { needed: Role, peer: String },
    #[error("this node is {0}; the command does not apply")]
    WrongRole(Role),
}

#[derive(Debug, Clone)]
struct PeerView {
    hb: Heartbeat,
    last_heard: Instant,
    alive: bool,
}

/// A read-only snapshot for `hasync status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreStatus {
    pub role: Role,
    pub epoch: u64,
    pub since: Instant,
    pub last_reason: Reason,
    pub peer_role: Option<Role>,
    pub peer_epoch: Option<u64>,
    pub peer_alive: bool,
    pub peer_last_heard: Option<Instant>,
    pub queue_push_pending: bool,
    pub restore_pending: bool,
    /// A switchover is being prepared (services stopping, replication
    /// draining) before the handover.
    pub handover_preparing: bool,
    /// What this node's stores hold (see [`Event::Replica`]).
    pub replica: ReplicaFill,
}

/// The failover state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    role: Role,
    since: Instant,
    last_reason: Reason,
    /// Highest epoch known; for a primary, the epoch it serves at.
    epoch: u64,
    held_primary: Option<u64>,
    peer: Option<PeerView>,
    seq: u64,
    timers: TimerTable,
    actions: VecDeque<Action>,
    /// The start-up wait has passed without a decision.
    startup_expired: bool,
    /// A queue push was raised and has not reported done.
    push_pending: bool,
    /// Restore-role: take the primary role back once push and catch-up finish.
    restore_pending: bool,
    catch_up_done: bool,
    /// We (a secondary) asked the primary to hand over.
    takeover_requested: bool,
    /// A split brain alarm was raised for this peer epoch (raise it once).
    split_brain_alarmed: Option<u64>,
    /// The last record made durable (or loaded at start).
    durable: EpochRecord,
    /// The highest epoch of any record handed out to be written. Records
    /// are written in order, so none may go below it: a record still in
    /// flight may land after a failure made this node fall back.
    persist_floor: u64,
    /// Records handed out and not answered yet; when none is left, the
    /// floor is the durable epoch again.
    persists_in_flight: u32,
    /// An epoch adopted from the peer while a record was in flight: it is
    /// written (as the latest record) once that one is answered. One
    /// adoption record in flight at a time, however often the peer's epoch
    /// rises: a peer cannot queue writes faster than the disk takes them.
    persist_owed: bool,
    /// While promoting: the epoch being made durable. It is not this
    /// node's epoch (not advertised, not served at) until it is durable.
    promoting_to: Option<u64>,
    /// While primary: a higher epoch being made durable because the peer
    /// (not primary) shows an epoch above this node's (a spent promotion,
    /// an abandoned tenure). The primary must hold the highest epoch the
    /// pair knows, or the replica's fence refuses its sessions. Served at
    /// only once durable.
    raising_to: Option<u64>,
    /// The state directory refused a write: the node stays failed, and
    /// every passing self-check retries the write as its probe, until one
    /// succeeds.
    persist_failed: bool,
    /// The operator ran `hasync join`: the recovery policy `off` has been
    /// served; a primary found now is joined as secondary.
    operator_joined: bool,
    /// A switchover being prepared ([`Action::PrepareHandover`]), and why.
    preparing: Option<Reason>,
    /// A step-down under way ([`Core::step_down`]), and why: it ends
    /// with this node `off`, whether the peer took over or not.
    off_after_handover: Option<String>,
    /// That step-down waits for the peer's first fill (alarmed once).
    step_down_waits: bool,
    /// The highest epoch the peer has shown (see `on_heartbeat`).
    peer_epoch_max: u64,
    /// After an abandoned switchover, the peer's takeover requests are not
    /// served before this.
    handover_cooldown_until: Option<Instant>,
    /// Ping quorum: this node reaches a majority of its targets.
    quorum_ok: bool,
    /// A promotion waiting for the quorum grace (ping mode), and why.
    quorum_promotion: Option<Reason>,
    /// Lease mode: held until then (unless renewed).
    lease_until: Option<Instant>,
    /// Lease mode: the fencing token of the lease held.
    lease_revision: Option<i64>,
    /// Lease mode: a promotion waiting for the lease, and why.
    lease_wanted: Option<Reason>,
    /// Lease mode: an unrenewable lease already alarmed.
    lease_alarmed: bool,
    /// What this node's stores hold: an incomplete one does not promote on
    /// its own, a fresh one not over an incomplete peer.
    replica: ReplicaFill,
    /// A promotion refused for an incomplete replica was alarmed (once,
    /// until a primary is heard again).
    incomplete_alarmed: bool,
}

impl Core {
    /// A node starting from its persisted record (its stores' fill not
    /// known: fresh until told otherwise).
    pub fn new(cfg: CoreConfig, persisted: EpochRecord, now: Instant) -> Core {
        Core::start(cfg, persisted, ReplicaFill::Fresh, now)
    }

    /// A node starting from its persisted record and what its stores hold
    /// (its first heartbeat already says so).
    pub fn start(
        cfg: CoreConfig,
        persisted: EpochRecord,
        replica: ReplicaFill,
        now: Instant,
    ) -> Core {
        let mut core = Core {
            cfg,
            role: Role::Negotiating,
            since: now,
            last_reason: Reason::Started,
            epoch: persisted.epoch,
            held_primary: persisted.held_primary,
            peer: None,
            seq: 0,
            timers: TimerTable::default(),
            actions: VecDeque::new(),
            startup_expired: false,
            push_pending: false,
            restore_pending: false,
            catch_up_done: false,
            takeover_requested: false,
            split_brain_alarmed: None,
            durable: persisted,
            persist_floor: persisted.epoch,
            persists_in_flight: 0,
            persist_owed: false,
            promoting_to: None,
            raising_to: None,
            persist_failed: false,
            operator_joined: false,
            preparing: None,
            off_after_handover: None,
            step_down_waits: false,
            peer_epoch_max: 0,
            handover_cooldown_until: None,
            quorum_ok: false,
            quorum_promotion: None,
            lease_until: None,
            lease_revision: None,
            lease_wanted: None,
            lease_alarmed: false,
            replica,
            incomplete_alarmed: false,
        };
        core.enter_negotiating(now, Reason::Started);
        core
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The record this node wants durable: while promoting, the new epoch.
    pub fn record(&self) -> EpochRecord {
        match self.promoting_to {
            Some(target) => EpochRecord {
                epoch: target,
                held_primary: Some(target),
            },
            None => EpochRecord {
                epoch: self.epoch,
                held_primary: self.held_primary,
            },
        }
    }

    /// The last record known to be durable.
    pub fn durable(&self) -> EpochRecord {
        self.durable
    }

    pub fn status(&self) -> CoreStatus {
        CoreStatus {
            role: self.role,
            epoch: self.epoch,
            since: self.since,
            last_reason: self.last_reason.clone(),
            peer_role: self.peer.as_ref().map(|p| p.hb.role),
            peer_epoch: self.peer.as_ref().map(|p| p.hb.epoch),
            peer_alive: self.peer.as_ref().is_some_and(|p| p.alive),
            peer_last_heard: self.peer.as_ref().map(|p| p.last_heard),
            queue_push_pending: self.push_pending,
            restore_pending: self.restore_pending,
            handover_preparing: self.preparing.is_some(),
            replica: self.replica,
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    pub fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Heartbeat(hb) => self.on_heartbeat(now, hb),
            Event::LinkUp => self.send_heartbeat(now),
            Event::Persisted(rec) => {
                self.persist_answered();
                self.on_persisted(now, rec);
                self.pay_owed_persist();
            }
            Event::PersistFailed(why) => {
                self.persist_answered();
                self.on_persist_failed(now, why);
                self.pay_owed_persist();
            }
            Event::SelfCheck(Err(why)) => {
                if self.role != Role::Failed {
                    self.actions
                        .push_back(Action::Alarm(Alarm::SelfCheckFailed(why.clone())));
                    self.enter_failed(now, Reason::SelfCheckFailed(why));
                }
            }
            Event::SelfCheck(Ok(())) => {
                if self.role != Role::Failed {
                } else if self.persist_failed {
                    // Directories look fine, but only a write proves the
                    // state directory takes records again: retry it, one
                    // write at a time (a slow failing disk must not build
                    // a backlog of retries).
                    if self.persists_in_flight == 0 {
                        self.persist();
                    }
                } else {
                    self.enter_negotiating(now, Reason::SelfCheckPassed);
                }
            }
            Event::QueuePushDone => {
                self.push_pending = false;
                if self.held_primary.is_some() && !self.role.is_live_primary() {
                    self.held_primary = None;
                    self.persist();
                }
                self.maybe_request_restore(now);
            }
            Event::QueuePushCancelled => self.push_pending = false,
            Event::HandoverPrepared => {
                if let Some(reason) = self.preparing.take() {
                    self.timers.clear(Timer::Prepare);
                    if self.role == Role::Primary && self.peer_alive() {
                        self.hand_over(now, reason);
                    } else {
                        self.abandon_handover(now, "the peer is gone".into());
                    }
                }
            }
            Event::HandoverPrepareFailed(why) => {
                if self.preparing.take().is_some() {
                    self.timers.clear(Timer::Prepare);
                    self.abandon_handover(now, why);
                }
            }
            Event::LeaseAcquired {
                valid_until,
                revision,
            } => {
                self.lease_until = Some(valid_until);
                self.lease_revision = Some(revision);
                self.lease_alarmed = false;
                self.arm_lease_check();
                if let Some(reason) = self.lease_wanted.take() {
                    if matches!(self.role, Role::Secondary | Role::Negotiating)
                        && !self.peer_is_live_primary()
                        && self.may_promote_on_own()
                    {
                        self.promote(now, reason);
                    } else {
                        // Taken for nothing: the peer serves after all.
                        self.release_lease();
                    }
                } else if !self.role.is_live_primary() {
                    self.release_lease();
                }
            }
            Event::LeaseRenewed { valid_until } => {
                if self.lease_until.is_some() {
                    self.lease_until = Some(valid_until);
                    self.lease_alarmed = false;
                    self.arm_lease_check();
                }
            }
            Event::LeaseRefused(why) => {
                if self.role.is_live_primary() && self.lease_until.is_none() && !self.peer_defers()
                {
                    self.stop_serving(now, Reason::LeaseLost(why.clone()));
                }
                if self.lease_wanted.is_some() {
                    if !self.lease_alarmed {
                        self.lease_alarmed = true;
                        self.actions
                            .push_back(Action::Alarm(Alarm::LeaseRefused(why)));
                    }
                    // Asked again a heartbeat interval later while it is
                    // still wanted.
                    self.timers
                        .set(Timer::LeaseRetry, now + self.cfg.heartbeat_interval);
                }
            }
            Event::LeaseLost(why) => {
                self.lease_until = None;
                if self.role.is_live_primary() {
                    if self.peer_defers() {
                        self.actions
                            .push_back(Action::Alarm(Alarm::LeaseUnrenewed(why)));
                        self.actions.push_back(Action::AcquireLease);
                    } else {
                        self.stop_serving(now, Reason::LeaseLost(why));
                    }
                }
            }
            Event::Quorum(ok) => {
                let was = self.quorum_ok;
                self.quorum_ok = ok;
                if was == ok || !matches!(self.cfg.quorum, QuorumRule::Ping { .. }) {
                } else if !ok {
                    if self.role.is_live_primary() && !self.peer_alive() {
                        self.step_down_isolated(now);
                    }
                } else if !self.peer_alive()
                    && (self.role == Role::Secondary
                        || (self.role == Role::Negotiating && self.startup_expired))
                {
                    self.promote_without_peer(now, Reason::PeerLostWithQuorum);
                }
            }
            Event::CatchUpDone => {
                self.catch_up_done = true;
                self.maybe_request_restore(now);
            }
            Event::Replica(fill) => {
                let was = self.replica;
                self.replica = fill;
                if was == fill {
                    return;
                }
                self.incomplete_alarmed = false;
                if fill == ReplicaFill::Filling {
                    // A promotion waiting for the quorum's grace or the
                    // lease was decided while the node held the mail.
                    if self.quorum_promotion.take().is_some() {
                        self.timers.clear(Timer::QuorumGrace);
                    }
                    if self.lease_wanted.take().is_some() {
                        self.timers.clear(Timer::LeaseRetry);
                    }
                }
                // The peer hears of it at once (its elections count it).
                self.send_heartbeat(now);
                if fill != ReplicaFill::Filling {
                    self.reconsider_promotion(now);
                }
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.take_expired(now) {
            match timer {
                Timer::Heartbeat => self.send_heartbeat(now),
                Timer::PeerLost => self.on_peer_lost(now),
                Timer::Startup => {
                    self.startup_expired = true;
                    if self.role == Role::Negotiating && !self.peer_alive() {
                        let waited = self.cfg.startup_wait;
                        self.promote_without_peer(now, Reason::NoPeerAtStartup { waited });
                    }
                }
                Timer::LeaseRetry => {
                    if self.lease_wanted.is_some() {
                        if matches!(self.role, Role::Secondary | Role::Negotiating)
                            && !self.peer_is_live_primary()
                        {
                            self.actions.push_back(Action::AcquireLease);
                        } else {
                            self.lease_wanted = None;
                        }
                    }
                }
                Timer::LeaseCheck => {
                    if let QuorumRule::Lease { margin, .. } = self.cfg.quorum {
                        let running_out = self.lease_until.is_none_or(|u| u <= now + margin);
                        if self.role.is_live_primary() && running_out {
                            if self.peer_defers() {
                                if !self.lease_alarmed {
                                    self.lease_alarmed = true;
                                    self.actions.push_back(Action::Alarm(Alarm::LeaseUnrenewed(
                                        "etcd does not answer".into(),
                                    )));
                                }
                                self.timers
                                    .set(Timer::LeaseCheck, now + self.cfg.heartbeat_interval);
                            } else {
                                self.stop_serving(
                                    now,
                                    Reason::LeaseLost("it runs out and the peer is silent".into()),
                                );
                            }
                        }
                    }
                }
                Timer::QuorumGrace => {
                    if let Some(reason) = self.quorum_promotion.take() {
                        let waiting = matches!(self.role, Role::Secondary | Role::Negotiating);
                        let quorum =
                            self.quorum_ok || matches!(self.cfg.quorum, QuorumRule::Lease { .. });
                        if waiting && !self.peer_alive() && quorum && self.may_promote_on_own() {
                            self.promote(now, reason);
                        }
                    }
                }
                Timer::Prepare => {
                    if self.preparing.take().is_some() {
                        let limit = self.cfg.prepare_handover.unwrap_or_default();
                        self.abandon_handover(
                            now,
                            format!(
                            "stopping services and draining replication took longer than {limit:?}"
                        ),
                        );
                    }
                }
                Timer::Handover => match self.role {
                    Role::HandingOver if self.off_after_handover.is_some() => {
                        let why = self.off_after_handover.take().unwrap_or_default();
                        self.become_role(now, Role::Off, Reason::SteppedDown(why));
                    }
                    Role::HandingOver => {
                        self.become_role(now, Role::Secondary, Reason::HandoverTimedOut);
                        // Give the peer a full window to show up as primary
                        // before we consider promoting again.
                        self.timers
                            .set(Timer::PeerLost, now + self.cfg.lost_window());
                    }
                    _ => self.takeover_requested = false,
                },
            }
        }
    }

    /// Operator: `hasync failover` on either node.
    pub fn request_switchover(&mut self, now: Instant) -> Result<(), CommandRefused> {
        match self.role {
            Role::Primary => {
                self.require_peer(Role::Secondary)?;
                self.start_handover(now, Reason::SwitchoverRequested);
                Ok(())
            }
            Role::Secondary => {
                self.require_peer(Role::Primary)?;
                self.takeover_requested = true;
                self.timers
                    .set(Timer::Handover, now + self.cfg.lost_window());
                self.send_heartbeat(now);
                Ok(())
            }
            other => Err(CommandRefused::WrongRole(other)),
        }
    }

    /// Driver: take this primary out of service (`off`; the peer takes
    /// over; `hasync join` brings it back). A live secondary gets the role
    /// as in a switchover: services stopped, replication drained, the role
    /// handed over; then, or if that fails, this node goes `off`. A peer
    /// whose replica is still filling must not serve with part of the mail
    /// (and would not take over from an `off` node): this node stays
    /// primary, replicating, until the peer's heartbeats say its replica is
    /// complete, and hands over then; it goes `off` if the peer is lost
    /// meanwhile.
    pub fn step_down(&mut self, now: Instant, why: String) -> Result<(), CommandRefused> {
        if self.role != Role::Primary {
            return Err(CommandRefused::WrongRole(self.role));
        }
        if self.require_peer(Role::Secondary).is_ok() && self.cfg.prepare_handover.is_some() {
            self.off_after_handover = Some(why);
            self.step_down_next(now);
            return Ok(());
        }
        self.become_role(now, Role::Off, Reason::SteppedDown(why));
        Ok(())
    }

    /// A step-down under way goes on: it waits while the peer's replica
    /// fills, and hands over once it is complete.
    fn step_down_next(&mut self, now: Instant) {
        let Some(why) = self.off_after_handover.clone() else {
            return;
        };
        if self.role != Role::Primary || self.preparing.is_some() {
            return;
        }
        if self.peer_filling() {
            if !std::mem::replace(&mut self.step_down_waits, true) {
                self.actions
                    .push_back(Action::Alarm(Alarm::StepDownWaitsForFill(why)));
            }
            return;
        }
        self.step_down_waits = false;
        self.start_handover(now, Reason::SteppedDown(why));
    }

    /// The peer's heartbeats, the last heard if it is silent now, say its
    /// replica is incomplete or was never filled.
    fn peer_filling(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.hb.flags & (FLAG_REPLICA_INCOMPLETE | FLAG_REPLICA_FRESH) != 0)
    }

    /// Operator: `hasync join` brings a node that is `off` back into the pair.
    pub fn join(&mut self, now: Instant) -> Result<(), CommandRefused> {
        if self.role != Role::Off {
            return Err(CommandRefused::WrongRole(self.role));
        }
        self.operator_joined = true;
        self.enter_negotiating(now, Reason::OperatorJoin);
        Ok(())
    }

    // ----- reactions -------------------------------------------------------

    fn on_heartbeat(&mut self, now: Instant, hb: Heartbeat) {
        if hb.node != self.cfg.peer_name {
            self.actions.push_back(Action::Alarm(Alarm::UnexpectedPeer {
                name: hb.node.clone(),
            }));
            return;
        }
        // While the peer is heard, its epoch does not decrease: a heartbeat
        // below the highest it has shown is stale (overtaken on another
        // path, or queued in a link). Taken as current, an old "secondary"
        // would make this node win an election against a peer that has
        // since promoted. Once the peer was lost this is forgotten: a peer
        // that restarts may show a lower epoch than it advertised (an
        // adopted epoch is advertised before it is durable).
        if self.peer_alive() && hb.epoch < self.peer_epoch_max {
            return;
        }
        self.peer_epoch_max = hb.epoch;
        if matches!(hb.role, Role::Primary | Role::Promoting) {
            // A primary again: a later refusal to promote is news.
            self.incomplete_alarmed = false;
            // A serving peer: a promotion this node was waiting to make
            // (quorum grace, lease) no longer applies; after a new loss it
            // starts over with its grace.
            if self.quorum_promotion.take().is_some() {
                self.timers.clear(Timer::QuorumGrace);
            }
            if self.lease_wanted.take().is_some() {
                self.timers.clear(Timer::LeaseRetry);
            }
        }
        self.peer = Some(PeerView {
            hb: hb.clone(),
            last_heard: now,
            alive: true,
        });
        self.timers
            .set(Timer::PeerLost, now + self.cfg.lost_window());

        match self.role {
            Role::Negotiating => self.negotiating_hears(now, &hb),
            Role::Secondary => self.secondary_hears(now, &hb),
            Role::Primary => self.primary_hears(now, &hb),
            Role::HandingOver => {
                if hb.role.is_live_primary() && hb.epoch > self.epoch {
                    self.adopt_epoch(hb.epoch);
                    if let Some(why) = self.off_after_handover.take() {
                        self.timers.clear(Timer::Handover);
                        self.become_role(now, Role::Off, Reason::SteppedDown(why));
                        return;
                    }
                    self.join_as_secondary(
                        now,
                        Reason::HandoverComplete {
                            peer_epoch: hb.epoch,
                        },
                        hb.epoch,
                    );
                }
            }
            // Promoting only waits for durability; Failed and Off only report.
            Role::Promoting | Role::Failed | Role::Off => {}
        }
    }

    fn negotiating_hears(&mut self, now: Instant, hb: &Heartbeat) {
        match hb.role {
            Role::Primary => {
                self.adopt_epoch(hb.epoch);
                let reason = Reason::PeerIsPrimary {
                    peer_epoch: hb.epoch,
                };
                if self.held_primary.is_some() {
                    // A recovered former primary: the configured policy applies.
                    match self.cfg.recovery {
                        RecoveryPolicy::BecomeSecondary => {
                            self.join_as_secondary(now, reason, hb.epoch)
                        }
                        RecoveryPolicy::RestoreRole => {
                            self.restore_pending = true;
                            self.catch_up_done = false;
                            self.join_as_secondary(now, reason, hb.epoch);
                        }
                        RecoveryPolicy::Off if !self.operator_joined => {
                            self.become_role(now, Role::Off, Reason::RecoveryPolicyOff)
                        }
                        // `hasync join`: the operator's decision that the
                        // policy is served: rejoin and hand the queue over.
                        RecoveryPolicy::Off => self.join_as_secondary(now, reason, hb.epoch),
                    }
                } else {
                    self.join_as_secondary(now, reason, hb.epoch);
                }
            }
            Role::Negotiating => {
                if self.wins_election(hb) && self.may_take_over_from(hb) {
                    self.promote(
                        now,
                        Reason::WonElection {
                            peer_priority: hb.priority,
                        },
                    );
                }
            }
            // A secondary whose replica is incomplete does not promote on
            // hearing us: this node serves if it holds the mail.
            Role::Secondary
                if hb.flags & FLAG_REPLICA_INCOMPLETE != 0 && self.may_take_over_from(hb) =>
            {
                self.promote(now, Reason::PeerReplicaIncomplete)
            }
            // The peer is about to be primary, or (a secondary) will promote on
            // hearing us: wait for it.
            Role::Promoting | Role::Secondary => {}
            Role::HandingOver => self.promote(now, Reason::PeerRole(hb.role)),
            Role::Failed | Role::Off => {
                if self.may_take_over_from(hb) {
                    self.promote(now, Reason::PeerRole(hb.role))
                }
            }
        }
    }

    fn secondary_hears(&mut self, now: Instant, hb: &Heartbeat) {
        match hb.role {
            Role::Primary | Role::Promoting => {
                if hb.epoch > self.epoch {
                    self.adopt_epoch(hb.epoch);
                }
                self.maybe_request_restore(now);
            }
            Role::Secondary => {
                if self.wins_election(hb) && self.may_take_over_from(hb) {
                    self.promote(
                        now,
                        Reason::WonElection {
                            peer_priority: hb.priority,
                        },
                    );
                }
            }
            // Handing over to this node: the switchover the operator asked.
            Role::HandingOver => self.promote(now, Reason::PeerRole(hb.role)),
            // No primary exists: the peer (re)started, stepped down or
            // failed. An incomplete replica waits: a restarted peer
            // promotes on hearing it.
            Role::Negotiating | Role::Failed | Role::Off => {
                if self.may_take_over_from(hb) {
                    self.promote(now, Reason::PeerRole(hb.role))
                }
            }
        }
    }

    fn primary_hears(&mut self, now: Instant, hb: &Heartbeat) {
        if !matches!(hb.role, Role::Primary | Role::Promoting)
            && self.role == Role::Primary
            && hb.epoch > self.epoch
            // One raise at a time: if the peer's epoch passed it meanwhile,
            // the first heartbeat after it lands raises again. A peer whose
            // epoch rose at every heartbeat cannot queue writes.
            && self.raising_to.is_none()
        {
            self.raise_epoch_above(hb.epoch);
        }
        match hb.role {
            Role::Primary | Role::Promoting => {
                let we_stay = self.wins_split_brain(hb);
                if self.split_brain_alarmed != Some(hb.epoch) {
                    self.split_brain_alarmed = Some(hb.epoch);
                    self.actions.push_back(Action::Alarm(Alarm::SplitBrain {
                        our_epoch: self.epoch,
                        peer_epoch: hb.epoch,
                        we_stay_primary: we_stay,
                    }));
                }
                if !we_stay {
                    let our_epoch = self.epoch;
                    self.adopt_epoch(hb.epoch);
                    self.join_as_secondary(
                        now,
                        Reason::SplitBrainLost {
                            our_epoch,
                            peer_epoch: hb.epoch,
                        },
                        hb.epoch,
                    );
                }
            }
            Role::Secondary
                if hb.flags & FLAG_TAKEOVER_REQUEST != 0
                    && !matches!(self.handover_cooldown_until, Some(t) if now < t) =>
            {
                self.start_handover(now, Reason::TakeoverRequestedByPeer);
            }
            Role::Secondary if self.off_after_handover.is_some() => self.step_down_next(now),
            _ => {}
        }
    }

    fn on_peer_lost(&mut self, now: Instant) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        if !peer.alive {
            return;
        }
        peer.alive = false;
        self.peer_epoch_max = 0;
        let silent_for = now.saturating_duration_since(peer.last_heard);
        self.actions
            .push_back(Action::Alarm(Alarm::PeerLost { silent_for }));
        if self.preparing.take().is_some() {
            self.timers.clear(Timer::Prepare);
            self.abandon_handover(now, "the peer was lost during the switchover".into());
        }
        if self.role == Role::Primary && self.off_after_handover.is_some() && !self.peer_filling() {
            // A step-down beside a peer that holds the mail: off, so that
            // it takes over when it is back. (One beside a peer still
            // filling waits on: that peer would not take over from an
            // `off` node, and its fill goes on from this node only.)
            if let Some(why) = self.off_after_handover.take() {
                self.become_role(
                    now,
                    Role::Off,
                    Reason::SteppedDown(format!("{why}; the peer was lost")),
                );
            }
        }
        match self.role {
            Role::Secondary => self.promote_without_peer(now, Reason::PeerLost { silent_for }),
            Role::Negotiating if self.startup_expired => {
                self.promote_without_peer(now, Reason::PeerLost { silent_for })
            }
            Role::Primary | Role::Promoting
                if matches!(self.cfg.quorum, QuorumRule::Ping { .. }) && !self.quorum_ok =>
            {
                self.step_down_isolated(now)
            }
            Role::Primary | Role::Promoting => {
                if let QuorumRule::Lease { margin, .. } = self.cfg.quorum {
                    if self.lease_until.is_none_or(|u| u <= now + margin) {
                        self.stop_serving(
                            now,
                            Reason::LeaseLost("unrenewed, and the peer is silent".into()),
                        );
                    }
                }
            }
            _ => {}
        }
    }

    /// The peer is silent: promote, if the quorum rule allows (ping: with a
    /// majority of the targets, after the grace).
    fn promote_without_peer(&mut self, now: Instant, reason: Reason) {
        // What the peer last said of its stores still counts: a fresh node
        // does not take over from an incomplete replica gone silent.
        let allowed = match self.peer.as_ref().map(|p| p.hb.clone()) {
            Some(hb) => self.may_take_over_from(&hb),
            None => self.may_promote_on_own(),
        };
        if !allowed {
            return;
        }
        match self.cfg.quorum {
            QuorumRule::None => self.promote(now, reason),
            QuorumRule::Lease { grace, .. } => {
                if self.quorum_promotion.is_none() {
                    self.quorum_promotion = Some(reason);
                    self.timers.set(Timer::QuorumGrace, now + grace);
                }
            }
            QuorumRule::Ping { grace } => {
                if !self.quorum_ok {
                    self.actions.push_back(Action::Alarm(Alarm::NoQuorum));
                    return;
                }
                if self.quorum_promotion.is_none() {
                    self.quorum_promotion = Some(reason);
                    self.timers.set(Timer::QuorumGrace, now + grace);
                }
            }
        }
    }

    /// May this node promote without a switchover? Not while its replica is
    /// incomplete: it holds only part of the mail, and users would find
    /// their mailboxes emptied while the peer, which holds the rest, is
    /// down (alarmed once until a primary is heard again).
    fn may_promote_on_own(&mut self) -> bool {
        if self.replica != ReplicaFill::Filling {
            return true;
        }
        if !self.incomplete_alarmed {
            self.incomplete_alarmed = true;
            self.actions
                .push_back(Action::Alarm(Alarm::ReplicaIncomplete));
        }
        false
    }

    /// May this node take over from a peer whose replica is incomplete?
    /// Only one known to hold the mail (it served, or its replica was
    /// complete): a fresh or replaced node would delete from the peer
    /// what only the peer holds (alarmed once).
    fn may_take_over_from(&mut self, peer: &Heartbeat) -> bool {
        if peer.flags & FLAG_REPLICA_INCOMPLETE == 0 {
            return self.may_promote_on_own();
        }
        if self.replica == ReplicaFill::Complete || self.held_primary.is_some() {
            return true;
        }
        if !self.incomplete_alarmed {
            self.incomplete_alarmed = true;
            let alarm = if self.replica == ReplicaFill::Filling {
                Alarm::ReplicaIncomplete
            } else {
                Alarm::FreshBesideIncomplete
            };
            self.actions.push_back(Action::Alarm(alarm));
        }
        false
    }

    /// The replica became complete or was accepted: a promotion it held
    /// back is made now, if still due (no primary heard).
    fn reconsider_promotion(&mut self, now: Instant) {
        if self.peer_is_live_primary() {
            return;
        }
        let peer = self.peer.as_ref().filter(|p| p.alive).map(|p| p.hb.clone());
        match (self.role, peer) {
            (Role::Secondary, None) => self.promote_without_peer(now, Reason::ReplicaAccepted),
            (Role::Negotiating, None) if self.startup_expired => {
                self.promote_without_peer(now, Reason::ReplicaAccepted)
            }
            (Role::Secondary, Some(hb)) => self.secondary_hears(now, &hb),
            (Role::Negotiating, Some(hb)) => self.negotiating_hears(now, &hb),
            _ => {}
        }
    }

    /// A primary (or promoting node) that reaches neither its peer nor a
    /// majority of its targets stops serving: it may be the isolated one,
    /// and the peer may be promoting.
    fn step_down_isolated(&mut self, now: Instant) {
        self.stop_serving(now, Reason::Isolated);
    }

    fn on_persisted(&mut self, now: Instant, rec: EpochRecord) {
        if rec.epoch >= self.durable.epoch {
            self.durable = rec;
        }
        let landing_promotion =
            self.role == Role::Promoting && self.promoting_to == Some(rec.epoch);
        if self.raising_to == Some(rec.epoch) && rec.held_primary == Some(rec.epoch) {
            self.raising_to = None;
            if self.role == Role::Primary {
                // Serving at the raised epoch from now on.
                self.epoch = rec.epoch;
                self.held_primary = Some(rec.epoch);
                self.send_heartbeat(now);
            }
        }
        if rec.epoch > self.epoch && !landing_promotion {
            // The record of a promotion abandoned while it was being written
            // (isolated, failed, lost the lease) landed after all. Durable
            // epochs never go back, so the epoch is spent and becomes this
            // node's; but it never served at it, and the record says so
            // again before anything relies on it.
            self.epoch = rec.epoch;
            if rec.held_primary != self.held_primary {
                self.persist();
            }
        }
        if self.persist_failed {
            self.persist_failed = false;
            if self.role == Role::Failed {
                self.enter_negotiating(now, Reason::PersistRecovered);
            }
            return;
        }
        if let (Role::Promoting, Some(target)) = (self.role, self.promoting_to) {
            if rec.held_primary == Some(target) && rec.epoch == target {
                self.promoting_to = None;
                self.epoch = target;
                self.held_primary = Some(target);
                self.restore_pending = false;
                self.takeover_requested = false;
                // A push towards a primary no longer applies: this node's
                // queue is the live queue again.
                self.push_pending = false;
                self.become_role(now, Role::Primary, Reason::EpochDurable);
            }
        }
    }

    /// A record could not be made durable: fall back to the last durable
    /// one (an epoch that is not on disk is not ours), and stay failed
    /// until a write succeeds. The alarm is raised once per episode.
    fn on_persist_failed(&mut self, now: Instant, why: String) {
        if self.persists_in_flight == 0 {
            // Nothing else is on its way to the disk: it holds the durable
            // record, and the next one may start from there again.
            self.persist_floor = self.durable.epoch;
        }
        self.promoting_to = None;
        self.raising_to = None;
        if self.role != Role::Primary {
            // A primary's epoch is durable (it became primary only then);
            // anything else not on disk is not this node's to advertise.
            self.epoch = self.durable.epoch;
            self.held_primary = self.durable.held_primary;
        }
        let first = !self.persist_failed;
        self.persist_failed = true;
        if first {
            self.actions
                .push_back(Action::Alarm(Alarm::PersistFailed(why.clone())));
        }
        if first || self.role != Role::Failed {
            self.enter_failed(now, Reason::PersistFailed(why));
        } else {
            self.last_reason = Reason::PersistFailed(why);
        }
    }

    // ----- transitions -----------------------------------------------------

    fn enter_negotiating(&mut self, now: Instant, reason: Reason) {
        self.startup_expired = false;
        self.timers.set(Timer::Startup, now + self.cfg.startup_wait);
        self.become_role(now, Role::Negotiating, reason);
        // A heartbeat already heard from a live peer is still news.
        if let Some(peer) = self.peer.clone() {
            if peer.alive {
                self.negotiating_hears(now, &peer.hb);
            }
        }
    }

    fn enter_failed(&mut self, now: Instant, reason: Reason) {
        self.timers.clear(Timer::Startup);
        self.timers.clear(Timer::Handover);
        self.takeover_requested = false;
        self.become_role(now, Role::Failed, reason);
    }

    fn join_as_secondary(&mut self, now: Instant, reason: Reason, peer_epoch: u64) {
        self.timers.clear(Timer::Startup);
        self.timers.clear(Timer::Handover);
        self.become_role(now, Role::Secondary, reason);
        if self.held_primary.is_some() {
            self.push_pending = true;
            self.actions
                .push_back(Action::StartQueuePush { peer_epoch });
        }
    }

    fn promote(&mut self, now: Instant, reason: Reason) {
        if let QuorumRule::Lease { margin, .. } = self.cfg.quorum {
            if self.lease_until.is_none_or(|u| u <= now + margin) {
                // Nobody promotes without the lease.
                if self.lease_wanted.is_none() {
                    self.actions.push_back(Action::AcquireLease);
                }
                self.lease_wanted = Some(reason);
                return;
            }
        }
        let peer_epoch = self.peer.as_ref().map_or(0, |p| p.hb.epoch);
        let target = self.next_owned_epoch(self.epoch.max(peer_epoch).max(self.persist_floor));
        self.promoting_to = Some(target);
        self.timers.clear(Timer::Startup);
        self.timers.clear(Timer::Handover);
        self.become_role(now, Role::Promoting, reason);
        self.persist();
    }

    fn start_handover(&mut self, now: Instant, reason: Reason) {
        if self.preparing.is_some() {
            return;
        }
        match self.cfg.prepare_handover {
            Some(limit) => {
                self.preparing = Some(reason);
                self.timers.set(Timer::Prepare, now + limit);
                self.actions.push_back(Action::PrepareHandover);
            }
            None => self.hand_over(now, reason),
        }
    }

    /// The switchover is off: this node serves again at its epoch.
    fn abandon_handover(&mut self, now: Instant, why: String) {
        if self.off_after_handover.is_some() && self.role == Role::Primary && self.peer_filling() {
            // A step-down whose drain took longer than a switchover may:
            // the peer's first fill goes on, and the handover after it.
            self.step_down_next(now);
            return;
        }
        if let Some(down) = self.off_after_handover.take() {
            // A step-down: this node does not serve again.
            self.actions
                .push_back(Action::Alarm(Alarm::StepDownHandoverFailed(why.clone())));
            if self.role == Role::Primary {
                self.become_role(
                    now,
                    Role::Off,
                    Reason::SteppedDown(format!("{down}; handing over failed: {why}")),
                );
            }
            return;
        }
        // The peer's takeover requests keep coming for a while: do not
        // start over (and flap the services) at each of them.
        self.handover_cooldown_until = Some(now + self.cfg.lost_window() * 4);
        self.actions
            .push_back(Action::Alarm(Alarm::SwitchoverAbandoned(why.clone())));
        if self.role == Role::Primary {
            self.actions.push_back(Action::ResumeService { why });
        }
    }

    fn hand_over(&mut self, now: Instant, reason: Reason) {
        self.timers
            .set(Timer::Handover, now + self.cfg.lost_window());
        self.become_role(now, Role::HandingOver, reason);
        // The successor needs the lease.
        self.release_lease();
    }

    fn release_lease(&mut self) {
        if matches!(self.cfg.quorum, QuorumRule::Lease { .. }) {
            self.lease_until = None;
            self.lease_revision = None;
            self.timers.clear(Timer::LeaseCheck);
            self.actions.push_back(Action::ReleaseLease);
        }
    }

    /// Lease mode: check again when the lease is about to run out.
    fn arm_lease_check(&mut self) {
        if let (QuorumRule::Lease { margin, .. }, Some(until)) = (self.cfg.quorum, self.lease_until)
        {
            self.timers.set(Timer::LeaseCheck, until - margin);
        }
    }

    /// The peer is heard and follows this node (it will not promote while
    /// it hears it): a secondary, or a node handing over, failed or off. A
    /// negotiating (restarting) peer does not count: it may promote.
    fn peer_defers(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| {
            p.alive
                && p.hb.flags & FLAG_HEARS_PEER != 0
                && matches!(
                    p.hb.role,
                    Role::Secondary | Role::HandingOver | Role::Failed | Role::Off
                )
        })
    }

    fn peer_is_live_primary(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.alive && matches!(p.hb.role, Role::Primary | Role::Promoting))
    }

    /// Stops serving for `reason` (lease or quorum lost): negotiating, so
    /// a primary peer is joined and, without one, promotion needs the
    /// lease or the quorum again.
    fn stop_serving(&mut self, now: Instant, reason: Reason) {
        self.promoting_to = None;
        self.release_lease();
        self.enter_negotiating(now, reason);
    }

    fn become_role(&mut self, now: Instant, role: Role, reason: Reason) {
        if self.role.is_live_primary()
            && !matches!(role, Role::Primary | Role::Promoting | Role::HandingOver)
            && self.lease_until.is_some()
        {
            // Demoted (split brain, a failed check, off): the lease goes.
            self.release_lease();
        }
        if role != Role::Promoting {
            // Whatever ends a promotion (isolation, a failed check, a lost
            // lease) ends its claim; a record still being written is dealt
            // with when it lands (`on_persisted`).
            self.promoting_to = None;
        }
        if role != Role::Primary {
            // Likewise a raise: its record, landing later, is a spent epoch.
            self.raising_to = None;
        }
        if role != Role::Primary && self.preparing.take().is_some() {
            // Left primary some other way (split brain, a failed check):
            // the preparation no longer applies.
            self.timers.clear(Timer::Prepare);
        }
        if !matches!(role, Role::Primary | Role::HandingOver) {
            // Whatever ends a tenure ends a step-down of it: a later
            // switchover is not one.
            self.off_after_handover = None;
            self.step_down_waits = false;
        }
        self.role = role;
        self.since = now;
        self.last_reason = reason.clone();
        self.actions.push_back(Action::Become {
            role,
            epoch: self.epoch,
            reason,
        });
        // Tell the peer at once; a role change must not wait for the next tick.
        self.send_heartbeat(now);
    }

    fn maybe_request_restore(&mut self, now: Instant) {
        if self.role == Role::Secondary
            && self.restore_pending
            && !self.push_pending
            && self.catch_up_done
            && !self.takeover_requested
            && self.peer_alive()
            && self
                .peer
                .as_ref()
                .is_some_and(|p| p.hb.role == Role::Primary)
        {
            self.takeover_requested = true;
            self.timers
                .set(Timer::Handover, now + self.cfg.lost_window());
            self.send_heartbeat(now);
        }
    }

    // ----- helpers ---------------------------------------------------------

    fn send_heartbeat(&mut self, now: Instant) {
        self.seq += 1;
        let mut flags = if self.takeover_requested && self.role == Role::Secondary {
            FLAG_TAKEOVER_REQUEST
        } else {
            0
        };
        if self.peer_alive() {
            flags |= FLAG_HEARS_PEER;
        }
        match self.replica {
            ReplicaFill::Filling => flags |= FLAG_REPLICA_INCOMPLETE,
            ReplicaFill::Fresh => flags |= FLAG_REPLICA_FRESH,
            ReplicaFill::Complete => {}
        }
        self.actions.push_back(Action::SendHeartbeat(Heartbeat {
            node: self.cfg.node_name.clone(),
            role: self.role,
            epoch: self.epoch,
            seq: self.seq,
            priority: self.cfg.priority,
            flags,
        }));
        self.timers
            .set(Timer::Heartbeat, now + self.cfg.heartbeat_interval);
    }

    fn persist(&mut self) {
        let mut rec = self.record();
        rec.epoch = rec.epoch.max(self.persist_floor);
        self.persist_floor = rec.epoch;
        self.persists_in_flight += 1;
        self.actions.push_back(Action::PersistEpoch(rec));
    }

    /// Serving primary, this node takes an epoch of its own above `seen`:
    /// durable first, advertised and served at once it lands.
    fn raise_epoch_above(&mut self, seen: u64) {
        let target = self.next_owned_epoch(seen.max(self.persist_floor));
        self.raising_to = Some(target);
        self.persist_floor = target;
        self.persists_in_flight += 1;
        self.actions.push_back(Action::PersistEpoch(EpochRecord {
            epoch: target,
            held_primary: Some(target),
        }));
    }

    fn persist_answered(&mut self) {
        self.persists_in_flight = self.persists_in_flight.saturating_sub(1);
    }

    fn adopt_epoch(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.epoch = epoch;
            if self.persists_in_flight == 0 {
                self.persist();
            } else {
                self.persist_owed = true;
            }
        }
    }

    /// The adoption deferred while a record was in flight: written once
    /// nothing is, with the latest epoch. After a failed write there is
    /// nothing to pay: a node that is not primary fell back to its durable
    /// epoch, and adopts the peer's again when it hears it.
    fn pay_owed_persist(&mut self) {
        if self.persist_owed && self.persists_in_flight == 0 {
            self.persist_owed = false;
            if !self.persist_failed && self.epoch > self.durable.epoch {
                self.persist();
            }
        }
    }

    fn peer_alive(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.alive)
    }

    fn require_peer(&self, needed: Role) -> Result<(), CommandRefused> {
        match &self.peer {
            Some(p) if p.alive && p.hb.role == needed => Ok(()),
            Some(p) if p.alive => Err(CommandRefused::PeerNotReady {
                needed,
                peer: p.hb.role.to_string(),
            }),
            _ => Err(CommandRefused::PeerNotReady {
                needed,
                peer: "not heard".to_string(),
            }),
        }
    }

    /// Parity of the epochs this node may take (see the module docs).
    fn owned_parity(&self) -> u64 {
        owned_parity(&self.cfg.node_name, &self.cfg.peer_name)
    }

    fn next_owned_epoch(&self, after: u64) -> u64 {
        let mut e = after + 1;
        if e % 2 != self.owned_parity() {
            e += 1;
        }
        e
    }

    /// Start-up election: higher priority, then the configured tie-break.
    fn wins_election(&self, peer: &Heartbeat) -> bool {
        // A node holding all the mail beats one whose replica is incomplete
        // (which one does not promote is for `may_take_over_from`).
        let peer_incomplete = peer.flags & FLAG_REPLICA_INCOMPLETE != 0;
        let incomplete = self.replica == ReplicaFill::Filling;
        if incomplete != peer_incomplete {
            return peer_incomplete;
        }
        if self.cfg.priority != peer.priority {
            return self.cfg.priority > peer.priority;
        }
        match self.cfg.tie_break {
            TieBreak::LowerName => self.cfg.node_name < peer.node,
            TieBreak::HigherName => self.cfg.node_name > peer.node,
        }
    }

    /// Split brain: higher epoch wins (epochs are unique per node, see module
    /// docs); equal epochs can only come from a misconfigured pair, and fall
    /// back to the election rule so that the outcome is still one primary.
    fn wins_split_brain(&self, peer: &Heartbeat) -> bool {
        if self.epoch != peer.epoch {
            return self.epoch > peer.epoch;
        }
        self.wins_election(peer)
    }
}

#[cfg(test)]
mod tests;
