//! The periodic gate: changes of a store replicated `sync = "periodic"` (a
//! mail queue) are held and let through together once per period.
//!
//! Sans-IO: the sender asks [`PeriodicGate::hold`] for every op leaving the
//! coalescer and pushes back into it whatever [`PeriodicGate::due`] or
//! [`PeriodicGate::release_all`] returns; the clock is the caller's. A
//! released op passes the gate exactly once (it comes back out of the
//! coalescer and must not be held again).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::tracker::Op;

/// Held changes of periodic stores.
#[derive(Debug, Default)]
pub struct PeriodicGate {
    /// Per store: its period, or `None` for a store sent at once.
    periods: Vec<Option<Duration>>,
    /// Changes held, in arrival order.
    held: Vec<Op>,
    /// Paths with a held `Sync`: a later `Sync` of one adds nothing (the
    /// release reads the path's state then).
    held_syncs: HashSet<(usize, PathBuf)>,
    /// Paths released and not yet seen again: let through once.
    released: HashSet<(usize, PathBuf)>,
    /// When each periodic store releases next.
    next_release: HashMap<usize, Instant>,
}

/// The path an op is held under: a rename's destination.
fn key(op: &Op) -> Option<(usize, PathBuf)> {
    match op {
        Op::Sync { store, rel, .. } => Some((*store, rel.clone())),
        Op::Rename { store, to, .. } => Some((*store, to.clone())),
        Op::Rescan { .. } => None,
    }
}

impl PeriodicGate {
    /// A gate for stores with these periods (`None`: not periodic).
    pub fn new(periods: Vec<Option<Duration>>) -> Self {
        Self {
            periods,
            ..Self::default()
        }
    }

    /// Holds `op` if its store is periodic and it was not just released;
    /// true if held. A rescan is never held (it asks for a comparison).
    pub fn hold(&mut self, op: &Op) -> bool {
        let Some((store, rel)) = key(op) else {
            return false;
        };
        if self.periods.get(store).copied().flatten().is_none() {
            return false;
        }
        if self.released.remove(&(store, rel.clone())) {
            return false;
        }
        if !matches!(op, Op::Sync { .. }) || self.held_syncs.insert((store, rel)) {
            self.held.push(op.clone());
        }
        true
    }

    /// The held ops of every store whose period has come round at `now`,
    /// in the order they were held; each passes the gate once.
    pub fn due(&mut self, now: Instant) -> Vec<Op> {
        let mut out = Vec::new();
        for (store, period) in self.periods.iter().enumerate() {
            let Some(period) = *period else { continue };
            let next = *self.next_release.entry(store).or_insert(now + period);
            if now < next {
                continue;
            }
            self.next_release.insert(store, now + period);
            let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|op| op.store() == store);
            self.held = rest;
            self.held_syncs.retain(|(s, _)| *s != store);
            out.extend(mine);
        }
        self.mark_released(&out);
        out
    }

    /// Every held op at once (a switchover drains the queue), each let
    /// through the gate once.
    pub fn release_all(&mut self) -> Vec<Op> {
        let out = std::mem::take(&mut self.held);
        self.held_syncs.clear();
        self.mark_released(&out);
        out
    }

    fn mark_released(&mut self, ops: &[Op]) {
        self.released.extend(ops.iter().filter_map(key));
    }

    /// Ops held now.
    pub fn held(&self) -> impl Iterator<Item = &Op> {
        self.held.iter()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(store: usize, rel: &str) -> Op {
        Op::Sync {
            store,
            rel: rel.into(),
            since: Instant::now(),
        }
    }

    fn paths(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::Sync { rel, .. } => rel.display().to_string(),
                Op::Rename { from, to, .. } => format!("{}->{}", from.display(), to.display()),
                Op::Rescan { .. } => "rescan".into(),
            })
            .collect()
    }

    #[test]
    fn only_periodic_stores_are_held_and_released_at_their_period() {
        let t0 = Instant::now();
        let mut g = PeriodicGate::new(vec![None, Some(Duration::from_secs(2))]);
        assert!(!g.hold(&sync(0, "mail/a")), "a store sent at once");
        // The first release is one period after the gate first looks.
        assert!(g.due(t0).is_empty());
        assert!(g.hold(&sync(1, "q/1")));
        assert!(g.hold(&sync(1, "q/1")), "held again, kept once");
        assert!(g.hold(&Op::Rename {
            store: 1,
            from: "q/2".into(),
            to: "q/3".into(),
            since: t0,
        }));
        assert!(!g.hold(&Op::Rescan {
            store: 1,
            reason: "overflow".into(),
            since: t0,
        }));
        assert!(g.due(t0 + Duration::from_millis(1999)).is_empty());
        let out = g.due(t0 + Duration::from_secs(2));
        assert_eq!(paths(&out), ["q/1", "q/2->q/3"]);
        assert!(g.is_empty());
        // Back out of the coalescer: let through once, then held again.
        for op in &out {
            assert!(!g.hold(op));
        }
        assert!(g.hold(&sync(1, "q/1")));
        assert!(g.due(t0 + Duration::from_millis(3999)).is_empty());
        assert_eq!(paths(&g.due(t0 + Duration::from_secs(4))), ["q/1"]);
    }

    /// A switchover's drain releases everything held; the released ops
    /// must pass the gate when they come back, or the drain never ends
    /// (the switchover timed out with a queue synced every minute).
    #[test]
    fn ops_released_for_a_drain_pass_the_gate_once() {
        let mut g = PeriodicGate::new(vec![Some(Duration::from_secs(60))]);
        assert!(g.hold(&sync(0, "q/1")));
        assert!(g.hold(&sync(0, "q/2")));
        let out = g.release_all();
        assert_eq!(paths(&out), ["q/1", "q/2"]);
        for op in &out {
            assert!(!g.hold(op), "released for the drain: sent now");
        }
        assert!(g.is_empty());
        assert!(g.hold(&sync(0, "q/1")), "a later change waits again");
    }
}
