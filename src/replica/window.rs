//! The ack window: the sender's batches in flight, in order, each closed by
//! a barrier the replica acknowledges once everything before it is durable.
//!
//! Sans-IO: sequence numbers, flow control and the ops the peer asked for
//! again live here; what a batch means to the index (its body) is the
//! sender's. An `Ack { seq }` acknowledges every batch whose barrier is at
//! or below `seq`, in order.
//!
//! A `Need` for an op arrives before the ack of its batch (the replica
//! reports a failed op at once and acknowledges after its flush), and may
//! arrive before the batch is even in flight (large files still streaming).
//! The op's ack must then not count the path as held. A need is kept until
//! an ack covers its op: forgetting needs because the window happened to
//! run empty (as the sender once did) dropped a need for the batch still
//! being sent, and its path was then taken as held and never sent again.

use std::collections::{HashSet, VecDeque};

/// Most ops in one batch.
pub const BATCH_OPS_MAX: usize = 512;
/// Full batches' worth of ops sent and not yet acknowledged.
pub const UNACKED_BATCHES_MAX: usize = 4;
/// Batches in flight at most, however small (a trickle of small batches
/// may pipeline deeper than big ones).
pub const INFLIGHT_BATCHES_MAX: usize = 32;

/// One batch in flight.
#[derive(Debug)]
pub struct Sent<T> {
    /// The sequence number of the batch's barrier (its last op).
    pub barrier: u64,
    /// Ops the batch carries (flow control).
    pub ops: u64,
    pub body: T,
}

/// Batches in flight and the numbering of ops.
#[derive(Debug)]
pub struct AckWindow<T> {
    inflight: VecDeque<Sent<T>>,
    ops_unacked: u64,
    seq: u64,
    /// Ops the peer failed to apply and asked for again, until an ack
    /// covers them.
    needed: HashSet<u64>,
}

impl<T> Default for AckWindow<T> {
    fn default() -> Self {
        Self {
            inflight: VecDeque::new(),
            ops_unacked: 0,
            seq: 0,
            needed: HashSet::new(),
        }
    }
}

impl<T> AckWindow<T> {
    /// Numbers the next op.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Takes back the number just handed out (the op was not sent).
    pub fn give_back(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.seq, "only the last number can be given back");
        if seq == self.seq {
            self.seq -= 1;
        }
    }

    /// The last number handed out (a batch's barrier takes it).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Room for another batch: at most [`UNACKED_BATCHES_MAX`] full
    /// batches' worth of ops and [`INFLIGHT_BATCHES_MAX`] batches in
    /// flight; an empty window is always open.
    pub fn is_open(&self) -> bool {
        self.inflight.len() < INFLIGHT_BATCHES_MAX
            && self.ops_unacked < (UNACKED_BATCHES_MAX * BATCH_OPS_MAX) as u64
            || self.inflight.is_empty()
    }

    /// A batch whose barrier is the last number handed out is on its way.
    pub fn sent(&mut self, ops: u64, body: T) {
        let barrier = self.seq;
        // A batch of ops all held back has the previous batch's barrier.
        debug_assert!(self.inflight.back().is_none_or(|b| b.barrier <= barrier));
        self.ops_unacked += ops;
        self.inflight.push_back(Sent { barrier, ops, body });
    }

    /// The peer acknowledged everything up to `seq`: the batches it
    /// covers, oldest first.
    pub fn acked(&mut self, seq: u64) -> Vec<Sent<T>> {
        let mut done = Vec::new();
        while self.inflight.front().is_some_and(|b| b.barrier <= seq) {
            let b = self.inflight.pop_front().expect("checked non-empty");
            self.ops_unacked = self.ops_unacked.saturating_sub(b.ops);
            done.push(b);
        }
        done
    }

    /// Forgets the needs of ops an ack covered (after the caller has read
    /// them with [`AckWindow::was_needed`]).
    pub fn forget_needs_through(&mut self, seq: u64) {
        self.needed.retain(|s| *s > seq);
    }

    /// The peer could not apply op `seq` and asked for its path again.
    pub fn need(&mut self, seq: u64) {
        self.needed.insert(seq);
    }

    /// Whether op `seq` was asked for again (kept for its ack).
    pub fn is_needed(&self, seq: u64) -> bool {
        self.needed.contains(&seq)
    }

    /// Whether op `seq` was asked for again (and forgets it).
    pub fn was_needed(&mut self, seq: u64) -> bool {
        self.needed.remove(&seq)
    }

    /// A session ended: what was in flight is found again by the next
    /// session's comparison. Numbering goes on.
    pub fn reset(&mut self) {
        self.inflight.clear();
        self.needed.clear();
        self.ops_unacked = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Ops sent and not yet acknowledged.
    pub fn ops_unacked(&self) -> u64 {
        self.ops_unacked
    }

    /// The batch sent last.
    pub fn last_mut(&mut self) -> Option<&mut Sent<T>> {
        self.inflight.back_mut()
    }

    /// The batches in flight, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Sent<T>> {
        self.inflight.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends a batch of `ops` numbered ops; returns their numbers.
    fn batch(w: &mut AckWindow<Vec<u64>>, ops: usize) -> Vec<u64> {
        let seqs: Vec<u64> = (0..ops).map(|_| w.next_seq()).collect();
        let _barrier = w.next_seq();
        w.sent(ops as u64, seqs.clone());
        seqs
    }

    #[test]
    fn acks_release_batches_in_order_and_open_the_window() {
        let mut w = AckWindow::default();
        assert!(w.is_open(), "empty");
        let mut barriers = Vec::new();
        for _ in 0..UNACKED_BATCHES_MAX {
            assert!(w.is_open());
            batch(&mut w, BATCH_OPS_MAX);
            barriers.push(w.last_seq());
        }
        assert!(!w.is_open(), "four full batches in flight");
        assert_eq!(
            w.ops_unacked(),
            (UNACKED_BATCHES_MAX * BATCH_OPS_MAX) as u64
        );
        // An ack between two barriers releases the first only.
        let done = w.acked(barriers[0] + 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].barrier, barriers[0]);
        assert!(w.is_open());
        let done = w.acked(barriers[3]);
        assert_eq!(
            done.iter().map(|b| b.barrier).collect::<Vec<_>>(),
            barriers[1..]
        );
        assert!(w.is_empty());
        assert_eq!(w.ops_unacked(), 0);
        assert!(w.acked(u64::MAX).is_empty(), "a repeated ack is harmless");
    }

    #[test]
    fn small_batches_pipeline_up_to_the_batch_limit() {
        let mut w = AckWindow::default();
        for _ in 0..INFLIGHT_BATCHES_MAX {
            assert!(w.is_open());
            batch(&mut w, 1);
        }
        assert!(!w.is_open());
    }

    /// The replica asks for an op of the batch still being sent while the
    /// previous batch is the last in flight, then acknowledges that one:
    /// the need must survive until the ack of its own batch.
    #[test]
    fn a_need_for_the_batch_being_sent_survives_the_previous_batchs_ack() {
        let mut w = AckWindow::default();
        batch(&mut w, 3);
        let first = w.last_seq();
        // The next batch is being planned and streamed: not in flight yet.
        let op = w.next_seq();
        w.need(op);
        let done = w.acked(first);
        assert_eq!(done.len(), 1);
        w.forget_needs_through(first);
        assert!(w.is_empty(), "the window ran empty");
        let _barrier = w.next_seq();
        w.sent(1, vec![op]);
        let done = w.acked(w.last_seq());
        assert!(
            w.was_needed(done[0].body[0]),
            "the op's ack must not count its path as held"
        );
    }

    #[test]
    fn needs_end_with_the_ack_that_covers_them_or_the_session() {
        let mut w = AckWindow::default();
        let seqs = batch(&mut w, 2);
        w.need(seqs[1]);
        w.acked(w.last_seq());
        w.forget_needs_through(w.last_seq());
        assert!(!w.was_needed(seqs[1]), "covered by the ack");
        let seqs = batch(&mut w, 1);
        w.need(seqs[0]);
        w.reset();
        assert!(!w.was_needed(seqs[0]));
        assert!(w.is_empty());
        assert_eq!(w.ops_unacked(), 0);
        assert!(w.next_seq() > seqs[0], "numbering goes on across sessions");
    }
}
