//! The core's timers: an enum indexing a small fixed table.

use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Next heartbeat to send.
    Heartbeat,
    /// The peer counts as lost when this passes without a heartbeat.
    PeerLost,
    /// End of the start-up wait while negotiating.
    Startup,
    /// End of a switchover attempt (handing over, or a takeover request).
    Handover,
    /// Deadline of a switchover's preparation (services, replication).
    Prepare,
    /// A promotion waiting for the ping-quorum grace.
    QuorumGrace,
    /// Lease mode: ask for the lease again.
    LeaseRetry,
    /// Lease mode: the lease held is about to run out.
    LeaseCheck,
}

impl Timer {
    const ALL: [Timer; 8] = [
        Timer::Heartbeat,
        Timer::PeerLost,
        Timer::Startup,
        Timer::Handover,
        Timer::Prepare,
        Timer::QuorumGrace,
        Timer::LeaseRetry,
        Timer::LeaseCheck,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub(super) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    pub(super) fn clear(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = None;
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Removes and returns the earliest timer that has expired at `now`.
    pub(super) fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let timer = Timer::ALL
            .into_iter()
            .filter(|t| self.deadlines[t.index()].is_some_and(|d| d <= now))
            .min_by_key(|t| self.deadlines[t.index()])?;
        self.clear(timer);
        Some(timer)
    }
}
