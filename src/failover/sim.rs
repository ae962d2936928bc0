//! Deterministic simulation of a pair of failover cores on a virtual clock.
//!
//! Used by the property tests, and usable by embedders who want to try a
//! policy against partitions, crashes and restarts without a network. Every
//! source of randomness comes from one seed, so a failing run replays exactly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Action, Core, CoreConfig, EpochRecord, Event, Heartbeat, ReplicaFill, Role};

/// A fault injected at a point of virtual time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The link drops everything in both directions for a while.
    Partition { for_ms: u64 },
    /// Heartbeats are lost with `percent` probability for a while.
    Loss { for_ms: u64, percent: u8 },
    /// The node's process dies (only its durable record survives) and
    /// restarts after `down_ms`.
    Crash { node: usize, down_ms: u64 },
    /// The node's self-check fails for a while.
    SelfFail { node: usize, for_ms: u64 },
    /// Operator runs `hasync failover` on the node.
    Switchover { node: usize },
    /// Operator runs `hasync join` on the node.
    Join { node: usize },
    /// The node's state directory refuses writes (disk full) for a while:
    /// every epoch persisted meanwhile fails.
    StateDirFull { node: usize, for_ms: u64 },
    /// The node is cut off from everything for a while: its peer (both
    /// directions) and its quorum targets.
    Isolate { node: usize, for_ms: u64 },
    /// The node is replaced (new disks): its process dies, and it comes
    /// back after `down_ms` with no state at all (epoch 0, a fresh replica
    /// that holds no mail).
    Replace { node: usize, down_ms: u64 },
    /// Operator runs `hasync accept-replica` on the node (applies to an
    /// incomplete replica).
    AcceptReplica { node: usize },
    /// The node's `on_primary` hook fails with `on_primary_failure =
    /// "step-down"` (applies to a primary).
    StepDown { node: usize },
}

impl FaultKind {
    /// How long after its start the fault still acts.
    fn duration_ms(&self) -> u64 {
        match *self {
            FaultKind::Partition { for_ms } | FaultKind::Loss { for_ms, .. } => for_ms,
            FaultKind::Crash { down_ms, .. } | FaultKind::Replace { down_ms, .. } => down_ms,
            FaultKind::SelfFail { for_ms, .. }
            | FaultKind::StateDirFull { for_ms, .. }
            | FaultKind::Isolate { for_ms, .. } => for_ms,
            FaultKind::Switchover { .. }
            | FaultKind::Join { .. }
            | FaultKind::AcceptReplica { .. }
            | FaultKind::StepDown { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub at_ms: u64,
    pub kind: FaultKind,
}

/// One simulated scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub configs: [CoreConfig; 2],
    /// Node 1 starts this much later than node 0.
    pub start_offset_ms: u64,
    /// One-way link delay is drawn uniformly from this range (ms).
    pub delay_ms: (u64, u64),
    /// Epoch persistence takes this long (ms).
    pub persist_ms: u64,
    /// A node's first fill as a secondary (its replica incomplete until
    /// then) takes this long (ms) of being secondary; 0: fills are not
    /// modelled.
    pub fill_ms: u64,
    pub faults: Vec<Fault>,
}

/// A broken invariant, with the time and history that led to it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
    pub history: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} violated at t={}ms: {}",
            self.seed, self.at_ms, self.what
        )?;
        writeln!(f, "last events:")?;
        for line in self.history.iter().rev().take(40).rev() {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What a finished run looked like.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub final_roles: [Option<Role>; 2],
    pub final_epochs: [u64; 2],
    pub promotions: usize,
    pub queue_pushes: usize,
    pub split_brain_alarms: usize,
    /// Switchovers abandoned (their preparation failed or took too long).
    pub switchovers_abandoned: usize,
    /// Promotions refused for an incomplete replica (alarms).
    pub incomplete_refusals: usize,
    /// Step-downs that handed the role over to a live secondary first.
    pub step_downs_handed_over: usize,
    /// Virtual time from the end of the last fault to a stable pair.
    pub converged_after_ms: Option<u64>,
}

/// SplitMix64: small, fast, and good enough to drive a simulation.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn percent(&mut self, p: u8) -> bool {
        self.next_u64() % 100 < u64::from(p)
    }
}

struct SimNode {
    cfg: CoreConfig,
    core: Option<Core>,
    durable: EpochRecord,
    max_durable_epoch: u64,
    persists: VecDeque<(u64, EpochRecord)>,
    self_ok: bool,
    /// Virtual ms since which the node has been primary without a break.
    primary_since: Option<u64>,
    push_done_at: Option<u64>,
    catch_up_at: Option<u64>,
    /// A switchover's preparation (services, replication drain) ends then.
    prepared_at: Option<u64>,
    /// The quorum verdict last fed to the core (ping mode).
    quorum_view: Option<bool>,
    /// Lease mode: the next renewal of a lease this node holds.
    next_renew_ms: u64,
    /// Lease mode: this process's driver holds a lease (a crash loses it;
    /// the key then runs out with its TTL).
    renewing: bool,
    /// Persists fail until this time (a full state directory).
    state_full_until: u64,
    /// The driver's next periodic self-check.
    next_check_ms: u64,
    /// Highest epoch heard from the peer.
    heard_max: u64,
    /// The node's replica (durable, as the driver's marks): fresh (never
    /// filled, never served), its first fill under way, or complete
    /// (filled, or it served).
    fill: ReplicaFill,
    /// The first fill ends then (while the node stays secondary).
    fill_done_at: Option<u64>,
}

struct InFlight {
    deliver_ms: u64,
    to: usize,
    hb: Heartbeat,
}

/// The simulator.
pub struct Sim {
    plan: Plan,
    rng: SimRng,
    base: Instant,
    now_ms: u64,
    nodes: [SimNode; 2],
    in_flight: Vec<InFlight>,
    /// Per direction (index = receiver), the time since which every
    /// heartbeat towards that receiver has been delivered.
    clean_since: [u64; 2],
    pending: Vec<(u64, Event2)>,
    history: Vec<String>,
    promotions: usize,
    queue_pushes: usize,
    split_brain_alarms: usize,
    switchovers_abandoned: usize,
    step_downs_handed_over: usize,
    incomplete_refusals: usize,
    /// Lease mode: the etcd key (holder, expiry) and its revision.
    lease: Option<(usize, u64)>,
    lease_revision: u64,
    /// Answers from etcd on their way: (due, node, event).
    lease_events: Vec<(u64, usize, Event)>,
    last_role_change_ms: u64,
    /// A violation found while feeding an event (outside the step's own
    /// checks): the run ends with it.
    found: Option<Violation>,
}

/// Internal scheduled happenings.
#[derive(Debug, Clone)]
enum Event2 {
    Fault(FaultKind),
    Start(usize),
    Restart(usize),
    SelfOk(usize),
    /// A secondary's first sync session begins: its replica is incomplete.
    FillStarts(usize),
    /// The node serves, its replica counts as complete: the driver says so.
    FillDone(usize),
    PartitionEnd,
    LossEnd,
}

impl Sim {
    pub fn new(plan: Plan) -> Sim {
        let base = Instant::now();
        let mk = |cfg: &CoreConfig| SimNode {
            cfg: cfg.clone(),
            core: None,
            durable: EpochRecord::default(),
            max_durable_epoch: 0,
            persists: VecDeque::new(),
            self_ok: true,
            primary_since: None,
            push_done_at: None,
            catch_up_at: None,
            prepared_at: None,
            quorum_view: None,
            next_renew_ms: 0,
            renewing: false,
            state_full_until: 0,
            next_check_ms: 0,
            heard_max: 0,
            fill: ReplicaFill::Fresh,
            fill_done_at: None,
        };
        let mut nodes = [mk(&plan.configs[0]), mk(&plan.configs[1])];
        if plan.fill_ms == 0 {
            // No first fill modelled: both nodes hold the mail.
            for n in nodes.iter_mut() {
                n.fill = ReplicaFill::Complete;
            }
        }
        let mut pending = vec![
            (0, Event2::Start(0)),
            (plan.start_offset_ms, Event2::Start(1)),
        ];
        for f in &plan.faults {
            pending.push((f.at_ms, Event2::Fault(f.kind.clone())));
        }
        Sim {
            rng: SimRng::new(plan.seed),
            plan,
            base,
            now_ms: 0,
            nodes,
            in_flight: Vec::new(),
            clean_since: [0, 0],
            pending,
            history: Vec::new(),
            promotions: 0,
            queue_pushes: 0,
            split_brain_alarms: 0,
            switchovers_abandoned: 0,
            step_downs_handed_over: 0,
            incomplete_refusals: 0,
            lease: None,
            lease_revision: 0,
            lease_events: Vec::new(),
            last_role_change_ms: 0,
            found: None,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn ms_of(&self, t: Instant) -> u64 {
        // Round up so that a timer is never handled before it is due.
        let d = t.saturating_duration_since(self.base);
        let ms = d.as_millis() as u64;
        if Duration::from_millis(ms) < d {
            ms + 1
        } else {
            ms
        }
    }

    fn partitioned(&self) -> bool {
        self.active_fault(|k| matches!(k, FaultKind::Partition { .. } | FaultKind::Isolate { .. }))
            .is_some()
    }

    /// The node isolated now, if any.
    fn isolated(&self) -> Option<usize> {
        match self.active_fault(|k| matches!(k, FaultKind::Isolate { .. })) {
            Some(FaultKind::Isolate { node, .. }) => Some(node),
            _ => None,
        }
    }

    /// Since when node `i` has reached (true) or missed (false) its
    /// quorum targets without a break.
    fn targets_since(&self, i: usize) -> (bool, u64) {
        let mut reach = true;
        let mut since = 0;
        for f in &self.plan.faults {
            if let FaultKind::Isolate { node, for_ms } = f.kind {
                if node == i && f.at_ms <= self.now_ms {
                    if self.now_ms < f.at_ms + for_ms {
                        // Overlapping isolations: cut off since the first.
                        since = if reach { f.at_ms } else { since.min(f.at_ms) };
                        reach = false;
                    } else if reach {
                        since = since.max(f.at_ms + for_ms);
                    }
                }
            }
        }
        (reach, since)
    }

    fn loss_percent(&self) -> u8 {
        match self.active_fault(|k| matches!(k, FaultKind::Loss { .. })) {
            Some(FaultKind::Loss { percent, .. }) => percent,
            _ => 0,
        }
    }

    fn active_fault(&self, pred: impl Fn(&FaultKind) -> bool) -> Option<FaultKind> {
        self.plan
            .faults
            .iter()
            .find(|f| {
                pred(&f.kind)
                    && f.at_ms <= self.now_ms
                    && self.now_ms < f.at_ms + f.kind.duration_ms()
            })
            .map(|f| f.kind.clone())
    }

    /// End of the last fault: from here on the pair must converge.
    pub fn quiet_from_ms(&self) -> u64 {
        self.plan
            .faults
            .iter()
            .map(|f| f.at_ms + f.kind.duration_ms())
            .max()
            .unwrap_or(0)
            .max(self.plan.start_offset_ms)
    }

    /// Bound on convergence after the last fault.
    pub fn convergence_bound_ms(&self) -> u64 {
        let c = &self.plan.configs[0];
        let interval = c.heartbeat_interval.as_millis() as u64;
        let window = c.lost_window().as_millis() as u64;
        let startup = self
            .plan
            .configs
            .iter()
            .map(|c| c.startup_wait.as_millis() as u64)
            .max()
            .unwrap_or(0);
        startup + 3 * window + 10 * interval + 4 * self.plan.persist_ms + 4 * self.plan.delay_ms.1
    }

    fn log(&mut self, line: String) {
        let entry = format!("t={:>6}ms {line}", self.now_ms);
        if self.history.len() > 400 {
            self.history.drain(..200);
        }
        self.history.push(entry);
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.plan.seed,
            at_ms: self.now_ms,
            what,
            history: self.history.clone(),
        }
    }

    /// Runs the plan until the pair has been quiet for the convergence bound
    /// plus a stability margin, checking the invariants after every step.
    pub fn run(mut self) -> Result<Outcome, Violation> {
        let quiet = self.quiet_from_ms();
        let bound = self.convergence_bound_ms();
        let end = quiet + bound;
        loop {
            let next = self.next_step_ms();
            match next {
                Some(t) if t <= end => self.now_ms = self.now_ms.max(t),
                _ => break,
            }
            self.step()?;
            if let Some(v) = self.found.take() {
                return Err(v);
            }
            self.check_invariants()?;
        }
        self.now_ms = end;
        // Convergence: exactly one primary, the other secondary or off.
        let roles = [self.role(0), self.role(1)];
        let primaries = roles.iter().filter(|r| **r == Some(Role::Primary)).count();
        let other_ok = roles
            .iter()
            .all(|r| matches!(r, Some(Role::Primary | Role::Secondary | Role::Off)));
        if primaries != 1 || !other_ok {
            return Err(self.violation(format!(
                "pair did not converge within {bound}ms after the last fault (ended at {quiet}ms): roles {roles:?}"
            )));
        }
        // A step-down ends with the node off: one still under way beside a
        // live secondary that holds the mail never handed over.
        for i in 0..2 {
            let stepping_down = self.nodes[i]
                .core
                .as_ref()
                .is_some_and(|c| c.off_after_handover.is_some());
            if stepping_down
                && roles[i] == Some(Role::Primary)
                && roles[1 - i] == Some(Role::Secondary)
                && self.nodes[1 - i].fill == ReplicaFill::Complete
            {
                return Err(self.violation(format!(
                    "node {i} stepped down but still serves beside a complete secondary"
                )));
            }
        }
        Ok(Outcome {
            final_roles: roles,
            final_epochs: [self.epoch(0), self.epoch(1)],
            promotions: self.promotions,
            queue_pushes: self.queue_pushes,
            split_brain_alarms: self.split_brain_alarms,
            switchovers_abandoned: self.switchovers_abandoned,
            step_downs_handed_over: self.step_downs_handed_over,
            incomplete_refusals: self.incomplete_refusals,
            converged_after_ms: Some(self.last_role_change_ms.saturating_sub(quiet)),
        })
    }

    fn lease_ttl_ms(&self, i: usize) -> u64 {
        match self.nodes[i].cfg.quorum {
            super::QuorumRule::Lease { ttl, .. } => ttl.as_millis() as u64,
            _ => 0,
        }
    }

    fn role(&self, i: usize) -> Option<Role> {
        self.nodes[i].core.as_ref().map(|c| c.role())
    }

    fn epoch(&self, i: usize) -> u64 {
        self.nodes[i].core.as_ref().map_or(0, |c| c.epoch())
    }

    fn next_step_ms(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut consider = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        for (t, _) in &self.pending {
            consider(*t);
        }
        for m in &self.in_flight {
            consider(m.deliver_ms);
        }
        for (t, _, _) in &self.lease_events {
            consider(*t);
        }
        let holder = self.lease.map(|(h, _)| h);
        for (i, n) in self.nodes.iter().enumerate() {
            if n.core.is_some() && n.renewing && holder == Some(i) {
                consider(n.next_renew_ms);
            }
            if let Some(core) = &n.core {
                if let Some(t) = core.poll_timeout() {
                    consider(self.ms_of(t));
                }
            }
            if let Some((t, _)) = n.persists.front() {
                consider(*t);
            }
            if n.core.is_some() {
                consider(n.next_check_ms);
            }
            if let Some(t) = n.push_done_at {
                consider(t);
            }
            if let Some(t) = n.prepared_at {
                consider(t);
            }

            if let Some(t) = n.catch_up_at {
                consider(t);
            }
            if let Some(t) = n.fill_done_at {
                consider(t);
            }
        }
        next
    }

    fn step(&mut self) -> Result<(), Violation> {
        let now_ms = self.now_ms;
        let now = self.at(now_ms);

        // Scheduled happenings.
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| *t <= now_ms);
        self.pending = rest;
        for (_, ev) in due {
            self.apply(now_ms, ev);
        }

        // Persist completions.
        for i in 0..2 {
            while let Some((t, rec)) = self.nodes[i].persists.front().cloned() {
                if t > now_ms {
                    break;
                }
                self.nodes[i].persists.pop_front();
                if self.nodes[i].core.is_none() {
                    continue;
                }
                if now_ms < self.nodes[i].state_full_until {
                    self.log(format!(
                        "node {i} cannot persist {rec:?}: state directory full"
                    ));
                    self.feed(i, now, Event::PersistFailed("simulated: no space".into()));
                    continue;
                }
                if rec.epoch < self.nodes[i].max_durable_epoch {
                    return Err(self.violation(format!(
                        "node {i} persisted epoch {} below its earlier durable epoch {}",
                        rec.epoch, self.nodes[i].max_durable_epoch
                    )));
                }
                self.log(format!("node {i} persisted {rec:?}"));
                self.nodes[i].durable = rec;
                self.nodes[i].max_durable_epoch = rec.epoch;
                self.feed(i, now, Event::Persisted(rec));
            }
            if self.nodes[i].core.is_some() && self.nodes[i].next_check_ms <= now_ms {
                // The driver checks its directories every heartbeat interval.
                let every = self.nodes[i].cfg.heartbeat_interval.as_millis() as u64;
                self.nodes[i].next_check_ms = now_ms + every.max(1);
                let res = if self.nodes[i].self_ok {
                    Ok(())
                } else {
                    Err("simulated".to_string())
                };
                self.feed(i, now, Event::SelfCheck(res));
                // The quorum prober's verdict: targets missed for a whole
                // detection window count as lost; one answer brings them
                // back.
                if matches!(self.nodes[i].cfg.quorum, super::QuorumRule::Ping { .. }) {
                    let (reach, since) = self.targets_since(i);
                    let window = self.nodes[i].cfg.lost_window().as_millis() as u64;
                    let view = reach || now_ms < since + window;
                    if self.nodes[i].quorum_view != Some(view) {
                        self.nodes[i].quorum_view = Some(view);
                        self.feed(i, now, Event::Quorum(view));
                    }
                }
            }
            if self.nodes[i].push_done_at.is_some_and(|t| t <= now_ms) {
                self.nodes[i].push_done_at = None;
                self.feed(i, now, Event::QueuePushDone);
            }
            if self.nodes[i].fill_done_at.is_some_and(|t| t <= now_ms) {
                self.nodes[i].fill_done_at = None;
                // A fill goes on only in a sync session: a primary serving
                // on the other side of a working link.
                let session = self.role(1 - i) == Some(Role::Primary) && !self.partitioned();
                if self.nodes[i].fill == ReplicaFill::Filling
                    && self.role(i) == Some(Role::Secondary)
                {
                    if session {
                        self.log(format!("node {i}: replica complete"));
                        self.nodes[i].fill = ReplicaFill::Complete;
                        self.feed(i, now, Event::Replica(ReplicaFill::Complete));
                    } else {
                        self.nodes[i].fill_done_at = Some(now_ms + self.plan.fill_ms);
                    }
                }
            }
            if self.nodes[i].catch_up_at.is_some_and(|t| t <= now_ms) {
                self.nodes[i].catch_up_at = None;
                self.feed(i, now, Event::CatchUpDone);
            }
            if self.nodes[i].prepared_at.is_some_and(|t| t <= now_ms) {
                // The drain is answered once every change is durable on
                // the peer: a peer whose first fill goes on has not got
                // everything yet (the preparation may time out first).
                if self.nodes[1 - i].fill == ReplicaFill::Complete {
                    self.nodes[i].prepared_at = None;
                    self.feed(i, now, Event::HandoverPrepared);
                } else {
                    self.nodes[i].prepared_at = Some(now_ms + self.plan.persist_ms + 1);
                }
            }
            // etcd's answers, and the holder's renewals (every ttl/3 while
            // it reaches etcd; an isolated holder's lease runs out).
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lease_events)
                .into_iter()
                .partition(|(t, n, _)| *t <= now_ms && *n == i);
            self.lease_events = later;
            for (_, _, ev) in due {
                if self.nodes[i].core.is_some() {
                    self.feed(i, now, ev);
                }
            }
            let ttl = self.lease_ttl_ms(i);
            if let Some((h, expires)) = self.lease {
                if h == i
                    && self.nodes[i].core.is_some()
                    && self.nodes[i].renewing
                    && self.nodes[i].next_renew_ms <= now_ms
                {
                    self.nodes[i].next_renew_ms = now_ms + (ttl / 3).max(1);
                    if self.isolated() == Some(i) {
                        // Unanswered: nothing to tell.
                    } else if expires > now_ms {
                        self.lease = Some((i, now_ms + ttl));
                        let valid_until = self.base + Duration::from_millis(now_ms + ttl);
                        self.feed(i, now, Event::LeaseRenewed { valid_until });
                    } else {
                        // etcd answers that the lease has expired.
                        self.nodes[i].renewing = false;
                        self.lease = None;
                        self.feed(i, now, Event::LeaseLost("expired".into()));
                    }
                }
            }
        }

        // Deliveries.
        let (arrived, flying): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|m| m.deliver_ms <= now_ms);
        self.in_flight = flying;
        for m in arrived {
            if self.nodes[m.to].core.is_some() {
                let n = &mut self.nodes[m.to];
                n.heard_max = n.heard_max.max(m.hb.epoch);
                self.feed(m.to, now, Event::Heartbeat(m.hb));
            }
        }

        // Timers.
        for i in 0..2 {
            let due = self.nodes[i]
                .core
                .as_ref()
                .and_then(|c| c.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                if let Some(core) = self.nodes[i].core.as_mut() {
                    core.handle_timeout(now);
                }
                self.drain(i)?;
            }
        }
        Ok(())
    }

    fn apply(&mut self, now_ms: u64, ev: Event2) {
        let now = self.at(now_ms);
        match ev {
            Event2::Start(i) | Event2::Restart(i) => {
                if self.nodes[i].core.is_none() {
                    let core = Core::start(
                        self.nodes[i].cfg.clone(),
                        self.nodes[i].durable,
                        self.nodes[i].fill,
                        now,
                    );
                    self.log(format!(
                        "node {i} starts from durable {:?}",
                        self.nodes[i].durable
                    ));
                    self.nodes[i].core = Some(core);

                    if !self.nodes[i].self_ok {
                        self.feed(i, now, Event::SelfCheck(Err("simulated".into())));
                    }
                    self.drain_noting(i);
                }
            }
            Event2::FillStarts(i) => {
                let secondary = self.role(i) == Some(Role::Secondary);
                if secondary && self.nodes[i].fill != ReplicaFill::Complete {
                    if self.nodes[i].fill == ReplicaFill::Fresh {
                        self.log(format!("node {i}: first fill starts"));
                        self.nodes[i].fill = ReplicaFill::Filling;
                    }
                    self.nodes[i].fill_done_at = Some(now_ms + self.plan.fill_ms);
                    self.feed(i, now, Event::Replica(ReplicaFill::Filling));
                }
            }
            Event2::FillDone(i) => self.feed(i, now, Event::Replica(ReplicaFill::Complete)),
            Event2::SelfOk(i) => {
                self.nodes[i].self_ok = true;
                self.feed(i, now, Event::SelfCheck(Ok(())));
            }
            Event2::PartitionEnd => self.log("partition heals".into()),
            Event2::LossEnd => self.log("loss ends".into()),
            Event2::Fault(kind) => {
                self.log(format!("fault {kind:?}"));
                match kind {
                    FaultKind::Partition { for_ms } => {
                        self.pending.push((now_ms + for_ms, Event2::PartitionEnd));
                    }
                    FaultKind::Loss { for_ms, .. } => {
                        self.pending.push((now_ms + for_ms, Event2::LossEnd));
                    }
                    FaultKind::Crash { node, down_ms } => self.crash(node, now_ms + down_ms),
                    FaultKind::Replace { node, down_ms } => {
                        self.crash(node, now_ms + down_ms);
                        // New disks: not even the durable state is left.
                        let n = &mut self.nodes[node];
                        n.durable = EpochRecord::default();
                        n.max_durable_epoch = 0;
                        n.heard_max = 0;
                        n.fill = ReplicaFill::Fresh;
                    }
                    FaultKind::AcceptReplica { node } => {
                        if self.nodes[node].fill == ReplicaFill::Filling
                            && self.nodes[node].core.is_some()
                        {
                            self.log(format!("operator accepts node {node}'s replica"));
                            self.nodes[node].fill = ReplicaFill::Complete;
                            self.nodes[node].fill_done_at = None;
                            self.feed(node, now, Event::Replica(ReplicaFill::Complete));
                        }
                    }
                    FaultKind::SelfFail { node, for_ms } => {
                        self.nodes[node].self_ok = false;
                        self.feed(node, now, Event::SelfCheck(Err("simulated".into())));
                        self.pending.push((now_ms + for_ms, Event2::SelfOk(node)));
                    }
                    FaultKind::Switchover { node } => {
                        if let Some(core) = self.nodes[node].core.as_mut() {
                            let r = core.request_switchover(now);
                            self.log(format!("switchover on node {node}: {r:?}"));
                            self.drain_noting(node);
                        }
                    }
                    FaultKind::Join { node } => {
                        if let Some(core) = self.nodes[node].core.as_mut() {
                            let _ = core.join(now);
                            self.drain_noting(node);
                        }
                    }
                    FaultKind::StepDown { node } => {
                        if let Some(core) = self.nodes[node].core.as_mut() {
                            let r = core.step_down(now, "on_primary hook failed".into());
                            self.log(format!("step-down on node {node}: {r:?}"));
                            self.drain_noting(node);
                        }
                    }
                    FaultKind::StateDirFull { node, for_ms } => {
                        self.nodes[node].state_full_until = now_ms + for_ms;
                    }
                    FaultKind::Isolate { node, for_ms } => {
                        self.log(format!("node {node} isolated for {for_ms}ms"));
                        self.pending.push((now_ms + for_ms, Event2::PartitionEnd));
                    }
                }
            }
        }
    }

    /// Node `i`'s process dies (what is durable stays) and restarts at
    /// `back_ms`.
    fn crash(&mut self, i: usize, back_ms: u64) {
        let n = &mut self.nodes[i];
        n.core = None;
        n.persists.clear();
        n.primary_since = None;
        n.push_done_at = None;
        n.catch_up_at = None;
        n.fill_done_at = None;
        n.prepared_at = None;
        n.quorum_view = None;
        n.renewing = false;
        self.in_flight.retain(|m| m.to != i);
        self.pending.push((back_ms, Event2::Restart(i)));
    }

    fn feed(&mut self, i: usize, now: Instant, ev: Event) {
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.handle_event(now, ev);
            self.drain_noting(i);
        }
    }

    /// [`Sim::drain`] where no error can be returned: the first violation
    /// is kept for the run to end with.
    fn drain_noting(&mut self, i: usize) {
        if let Err(v) = self.drain(i) {
            self.found.get_or_insert(v);
        }
    }

    fn drain(&mut self, i: usize) -> Result<(), Violation> {
        let now_ms = self.now_ms;
        while let Some(action) = self.nodes[i].core.as_mut().and_then(|c| c.poll_action()) {
            match action {
                Action::SendHeartbeat(hb) => {
                    let n = &self.nodes[i];
                    if hb.epoch > n.durable.epoch.max(n.heard_max) {
                        return Err(self.violation(format!(
                            "node {i} advertises epoch {} as {} although its durable epoch is {} and the peer's highest is {}",
                            hb.epoch, hb.role, n.durable.epoch, n.heard_max
                        )));
                    }
                    let to = 1 - i;
                    let lost = self.partitioned() || {
                        let p = self.loss_percent();
                        p > 0 && self.rng.percent(p)
                    };
                    if lost || self.nodes[to].core.is_none() {
                        self.clean_since[to] = now_ms;
                    } else {
                        let (lo, hi) = self.plan.delay_ms;
                        let d = self.rng.range(lo, hi);
                        // TCP keeps order: never deliver before an earlier frame.
                        let floor = self
                            .in_flight
                            .iter()
                            .filter(|m| m.to == to)
                            .map(|m| m.deliver_ms)
                            .max()
                            .unwrap_or(0);
                        self.in_flight.push(InFlight {
                            deliver_ms: (now_ms + d).max(floor),
                            to,
                            hb,
                        });
                    }
                }
                Action::PersistEpoch(rec) => {
                    let t = now_ms + self.plan.persist_ms;
                    self.nodes[i].persists.push_back((t, rec));
                }
                Action::Become {
                    role,
                    epoch,
                    reason,
                } => {
                    self.log(format!("node {i} -> {role} epoch {epoch} ({reason})"));
                    self.last_role_change_ms = now_ms;
                    if role == Role::HandingOver && matches!(reason, super::Reason::SteppedDown(_))
                    {
                        self.step_downs_handed_over += 1;
                    }
                    if role == Role::Promoting {
                        self.promotions += 1;
                        self.check_no_spurious_promotion(i)?;
                        if self.nodes[i].fill == ReplicaFill::Filling
                            && reason != super::Reason::PeerRole(Role::HandingOver)
                        {
                            return Err(self.violation(format!(
                                "node {i} promoted on its own ({reason}) with an incomplete replica"
                            )));
                        }
                        // Over a peer it hears whose replica is incomplete,
                        // only a node that held the mail takes over.
                        let over_peer = matches!(
                            reason,
                            super::Reason::WonElection { .. }
                                | super::Reason::PeerReplicaIncomplete
                        ) || matches!(reason, super::Reason::PeerRole(r) if r != Role::HandingOver);
                        if over_peer
                            && self.nodes[i].fill == ReplicaFill::Fresh
                            && self.nodes[1 - i].fill == ReplicaFill::Filling
                        {
                            return Err(self.violation(format!(
                                "node {i}, which never held the mail, took over ({reason}) from node {} whose replica is incomplete",
                                1 - i
                            )));
                        }
                    }
                    if role == Role::Primary {
                        self.nodes[i].primary_since = Some(now_ms);
                        // What a primary serves is its store: the driver
                        // marks it complete.
                        if self.nodes[i].fill != ReplicaFill::Complete {
                            self.pending.push((now_ms, Event2::FillDone(i)));
                        }
                        self.nodes[i].fill = ReplicaFill::Complete;
                    } else {
                        self.nodes[i].primary_since = None;
                    }
                    if role == Role::Secondary {
                        let t = now_ms + 3 * self.plan.persist_ms + 1;
                        self.nodes[i].catch_up_at = Some(t);
                        if self.plan.fill_ms > 0 && self.nodes[i].fill != ReplicaFill::Complete {
                            self.pending.push((now_ms + 1, Event2::FillStarts(i)));
                        }
                    } else {
                        self.nodes[i].fill_done_at = None;
                    }
                }
                Action::StartQueuePush { peer_epoch } => {
                    self.log(format!("node {i} starts queue push to epoch {peer_epoch}"));
                    self.queue_pushes += 1;
                    self.nodes[i].push_done_at = Some(now_ms + 2 * self.plan.persist_ms + 1);
                }
                Action::PrepareHandover => {
                    self.log(format!("node {i} prepares its handover"));
                    self.nodes[i].prepared_at = Some(now_ms + 5 * self.plan.persist_ms + 1);
                }
                Action::ResumeService { why } => {
                    self.log(format!("node {i} serves again: {why}"));
                }
                Action::AcquireLease => {
                    let ttl = self.lease_ttl_ms(i);
                    let reachable = self.isolated() != Some(i);
                    let free = match self.lease {
                        None => true,
                        Some((holder, expires)) => holder == i || expires <= now_ms,
                    };
                    let at = now_ms + self.plan.persist_ms;
                    if reachable && free {
                        self.lease_revision += 1;
                        self.lease = Some((i, now_ms + ttl));
                        self.nodes[i].renewing = true;
                        self.nodes[i].next_renew_ms = now_ms + (ttl / 3).max(1);
                        self.log(format!(
                            "node {i} takes the lease (revision {})",
                            self.lease_revision
                        ));
                        self.lease_events.push((
                            at,
                            i,
                            Event::LeaseAcquired {
                                valid_until: self.base + Duration::from_millis(now_ms + ttl),
                                revision: self.lease_revision as i64,
                            },
                        ));
                    } else {
                        let why = if reachable {
                            "held by the peer"
                        } else {
                            "etcd unreachable"
                        };
                        self.lease_events
                            .push((at, i, Event::LeaseRefused(why.to_string())));
                    }
                }
                Action::ReleaseLease => {
                    self.nodes[i].renewing = false;
                    if self.isolated() != Some(i) && matches!(self.lease, Some((h, _)) if h == i) {
                        self.log(format!("node {i} releases the lease"));
                        self.lease = None;
                    }
                }
                Action::Alarm(alarm) => {
                    if matches!(alarm, super::Alarm::SplitBrain { .. }) {
                        self.split_brain_alarms += 1;
                    }
                    if matches!(alarm, super::Alarm::ReplicaIncomplete) {
                        self.incomplete_refusals += 1;
                    }
                    if matches!(alarm, super::Alarm::SwitchoverAbandoned(_)) {
                        self.switchovers_abandoned += 1;
                    }
                    self.log(format!("node {i} alarm: {alarm}"));
                }
            }
        }
        Ok(())
    }

    /// A secondary that hears a live primary never promotes.
    fn check_no_spurious_promotion(&self, i: usize) -> Result<(), Violation> {
        let peer = 1 - i;
        let cfg = &self.nodes[i].cfg;
        let margin = cfg.lost_window().as_millis() as u64 + self.plan.delay_ms.1 + 1;
        let Some(since) = self.nodes[peer].primary_since else {
            return Ok(());
        };
        let quiet_link = self.clean_since[i] + margin <= self.now_ms;
        let long_primary = since + margin <= self.now_ms;
        if quiet_link && long_primary {
            return Err(self.violation(format!(
                "node {i} promoted although node {peer} has been primary since {since}ms and every heartbeat since {}ms arrived",
                self.clean_since[i]
            )));
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), Violation> {
        // Lease mode: never two primaries, partitions and isolations
        // included (heartbeat loss, which can be one-sided, excepted: a
        // primary that still hears its peer serves on without the lease
        // until it hears the successor).
        let lease = self
            .nodes
            .iter()
            .all(|n| matches!(n.cfg.quorum, super::QuorumRule::Lease { .. }));
        if lease && self.role(0) == Some(Role::Primary) && self.role(1) == Some(Role::Primary) {
            let lossy = self.plan.faults.iter().any(|f| {
                matches!(f.kind, FaultKind::Loss { .. })
                    && f.at_ms <= self.now_ms
                    && self.now_ms < f.at_ms + f.kind.duration_ms() + self.lease_ttl_ms(0) * 2
            });
            if !lossy {
                return Err(self.violation("two primaries in lease mode".to_string()));
            }
        }
        let ping = self
            .nodes
            .iter()
            .all(|n| matches!(n.cfg.quorum, super::QuorumRule::Ping { .. }));
        if let (Some(a), Some(b), Some(k), true) = (
            &self.nodes[0].core,
            &self.nodes[1].core,
            self.isolated(),
            ping,
        ) {
            // Two primaries before the isolation (a partition that left
            // both reaching their targets) end once the isolated one has
            // seen its targets and its peer gone: a detection window and a
            // probe round, the stated bound.
            let (_, since) = self.targets_since(k);
            let cfg = &self.nodes[k].cfg;
            let bound = cfg.lost_window().as_millis() as u64
                + 2 * cfg.heartbeat_interval.as_millis() as u64
                + self.plan.delay_ms.1
                + 1;
            if a.role() == Role::Primary && b.role() == Role::Primary && self.now_ms > since + bound
            {
                return Err(self.violation(format!(
                    "two primaries while node {k} is cut off from its peer and its quorum targets (ping quorum), {}ms into the isolation",
                    self.now_ms - since
                )));
            }
        }
        if let (Some(a), Some(b)) = (&self.nodes[0].core, &self.nodes[1].core) {
            if a.role() == Role::Primary && b.role() == Role::Primary && a.epoch() == b.epoch() {
                return Err(
                    self.violation(format!("two primaries at the same epoch {}", a.epoch()))
                );
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(core) = &n.core {
                if core.role() == Role::Primary && n.durable.epoch < core.epoch() {
                    return Err(self.violation(format!(
                        "node {i} acts as primary at epoch {} before it is durable (durable {})",
                        core.epoch(),
                        n.durable.epoch
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The operator's `kind` on each node, three detection windows after the
/// last fault of `list` is over.
fn after_the_faults(list: &mut Vec<Fault>, window: u64, kind: impl Fn(usize) -> FaultKind) {
    let last = list
        .iter()
        .map(|f| f.at_ms + f.kind.duration_ms())
        .max()
        .unwrap_or(0);
    for node in 0..2 {
        list.push(Fault {
            at_ms: last + window * 3,
            kind: kind(node),
        });
    }
}

/// Draws a random plan from a seed: the generator behind the seeded property
/// test. `faults` says how many faults at most.
pub fn random_plan(seed: u64, base: &[CoreConfig; 2], faults: usize) -> Plan {
    let mut rng = SimRng::new(seed ^ 0x005E_ED0F_4A11);
    let mut configs = base.clone();
    let interval_ms = rng.range(20, 400);
    let threshold = rng.range(2, 8) as u32;
    for c in configs.iter_mut() {
        c.heartbeat_interval = Duration::from_millis(interval_ms);
        c.heartbeat_lost_threshold = threshold;
        c.startup_wait = c.lost_window() * rng.range(1, 3) as u32;
        c.priority = rng.range(0, 3) as u8 * 50;
        c.recovery = match rng.range(0, 5) {
            0 => super::RecoveryPolicy::Off,
            1 | 2 => super::RecoveryPolicy::RestoreRole,
            _ => super::RecoveryPolicy::BecomeSecondary,
        };
    }
    let tie = if rng.percent(50) {
        super::TieBreak::LowerName
    } else {
        super::TieBreak::HigherName
    };
    configs[0].tie_break = tie;
    configs[1].tie_break = tie;
    let window = interval_ms * u64::from(threshold);
    let horizon = window * 12;
    let mut list = Vec::new();
    let n = rng.range(0, faults as u64);
    for _ in 0..n {
        let at_ms = rng.range(0, horizon);
        let node = rng.range(0, 1) as usize;
        let kind = match rng.range(0, 10) {
            0 | 1 => FaultKind::Partition {
                for_ms: rng.range(interval_ms / 2, window * 4),
            },
            2 => FaultKind::Loss {
                for_ms: rng.range(interval_ms, window * 3),
                percent: rng.range(10, 90) as u8,
            },
            3..=5 => FaultKind::Crash {
                node,
                down_ms: rng.range(1, window * 4),
            },
            6 => FaultKind::SelfFail {
                node,
                for_ms: rng.range(1, window * 3),
            },
            7 => FaultKind::Switchover { node },
            8 => FaultKind::StateDirFull {
                node,
                for_ms: rng.range(1, window * 4),
            },
            _ => FaultKind::Join { node },
        };
        list.push(Fault { at_ms, kind });
    }
    list.sort_by_key(|f| f.at_ms);
    // The operator eventually brings a node that stayed `off` back.
    after_the_faults(&mut list, window, |node| FaultKind::Join { node });
    // A first fill as secondary (the replica incomplete meanwhile) in
    // three plans of four; drawn apart too.
    let mut fill = SimRng::new(seed ^ 0x00F1_11ED_0001);
    let fill_ms = if fill.percent(75) {
        fill.range(1, window * 6)
    } else {
        0
    };
    // A node replaced (new disks) in one plan of five that models fills;
    // a replaced node beside an incomplete replica waits for the
    // operator, who accepts that replica once the faults are over.
    if fill_ms > 0 && fill.percent(20) {
        // Early: while the first fill runs, mostly.
        list.push(Fault {
            at_ms: fill.range(window, window + fill_ms * 2),
            kind: FaultKind::Replace {
                node: fill.range(0, 1) as usize,
                down_ms: fill.range(1, window * 4),
            },
        });
        list.sort_by_key(|f| f.at_ms);
        after_the_faults(&mut list, window, |node| FaultKind::AcceptReplica { node });
    }
    // Switchovers prepared (services stopped, replication drained) or not;
    // a preparation limit shorter than the simulated preparation abandons
    // the switchover. Drawn apart so the rest of a seed's plan is unchanged.
    let mut prep = SimRng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    for c in configs.iter_mut() {
        c.prepare_handover = match prep.range(0, 2) {
            0 => None,
            1 => Some(Duration::from_millis(prep.range(1, 40))),
            _ => Some(Duration::from_secs(2)),
        };
    }
    // A third of the plans use the ping quorum, another third the etcd
    // lease, and isolate nodes (cut from the peer and the targets or etcd)
    // on top of their other faults.
    let third_vote = prep.range(0, 2);
    if third_vote == 2 {
        for c in configs.iter_mut() {
            c.quorum = super::QuorumRule::Lease {
                grace: c.lost_window() + c.heartbeat_interval,
                margin: c.heartbeat_interval * 2,
                ttl: c.lost_window() * 3,
            };
        }
        for _ in 0..prep.range(1, 3) {
            list.push(Fault {
                at_ms: prep.range(0, horizon),
                kind: FaultKind::Isolate {
                    node: prep.range(0, 1) as usize,
                    for_ms: prep.range(interval_ms, window * 6),
                },
            });
        }
        list.sort_by_key(|f| f.at_ms);
    } else if third_vote == 1 {
        for c in configs.iter_mut() {
            c.quorum = super::QuorumRule::Ping {
                grace: c.lost_window() + c.heartbeat_interval,
            };
        }
        for _ in 0..prep.range(1, 3) {
            list.push(Fault {
                at_ms: prep.range(0, horizon),
                kind: FaultKind::Isolate {
                    node: prep.range(0, 1) as usize,
                    for_ms: prep.range(interval_ms, window * 6),
                },
            });
        }
        list.sort_by_key(|f| f.at_ms);
    }
    // A primary's on_primary hook fails (step-down) in one plan of four,
    // and the operator brings the node back afterwards.
    let mut down = SimRng::new(seed ^ 0x0057_E9D0_3A11);
    if down.percent(25) {
        list.push(Fault {
            at_ms: down.range(0, horizon),
            kind: FaultKind::StepDown {
                node: down.range(0, 1) as usize,
            },
        });
        list.sort_by_key(|f| f.at_ms);
        after_the_faults(&mut list, window, |node| FaultKind::Join { node });
    }
    Plan {
        seed,
        configs,
        start_offset_ms: rng.range(0, window * 2),
        delay_ms: (0, (interval_ms / 3).max(1)),
        persist_ms: rng.range(0, (interval_ms / 4).max(1)),
        fill_ms,
        faults: list,
    }
}
