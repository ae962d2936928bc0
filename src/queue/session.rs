//! The queue push as two sans-IO state machines: what the pusher (the
//! former primary) and the ingester (the new primary) decide, apart from
//! the reading, staging, flushing and sockets their drivers in `push` do.
//! The queue simulator (`queue::sim`) drives the same two against a model
//! of both nodes' disks, a link that cuts, and crashes.
//!
//! The rules they hold:
//! - the pusher sends whole windows, each closed by a barrier, at most two
//!   outstanding; it hands a message back for deletion only on an
//!   acknowledgement that the new primary holds it (ingested durably, or a
//!   duplicate of one it holds), and keeps it on a refusal;
//! - an acknowledgement for a message not in flight, or anything after the
//!   end, is a protocol violation (the session is cut, nothing deleted);
//! - the ingester drops a message it holds (ledger, own queue, or staged
//!   and not yet acknowledged) as a duplicate, commits what is staged as
//!   one batch (on a barrier, a full batch, or the end; one commit at a
//!   time), and acknowledges a batch's messages only when its commit
//!   reports: ingested if it succeeded, refused otherwise;
//! - the end is answered only after every staged message is acknowledged.

use std::collections::{HashSet, VecDeque};

use crate::wire::sync::QueueOutcome;

/// Messages a pusher opens before it closes the window with a barrier.
/// A window is one commit on the new primary, whose three flushes cost the
/// same for one message as for a thousand: the bigger the window, the
/// fewer flushes per message. (The pusher takes acknowledgements through a
/// reader task of its own while it sends: a window's worth of them never
/// waits on its socket.)
pub const WINDOW: usize = 1024;
/// Most messages the ingester commits together.
pub const INGEST_BATCH: usize = 1024;
/// Messages staged and not yet acknowledged at most: a pusher keeps two
/// windows in flight; more is a protocol error.
pub const UNACKED_MESSAGES_MAX: usize = 4 * INGEST_BATCH;

/// A rule of the push the peer broke: the session is cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("acknowledgement for unknown message {0}")]
    UnknownAck(u64),
    #[error("an acknowledgement after the end of the push")]
    AckAfterEnd,
    #[error("an end acknowledgement before the end was sent")]
    EarlyEnd,
    #[error("more than {0} messages sent unacknowledged")]
    TooManyUnacked(usize),
    #[error("a message after the end of a queue push")]
    AfterEnd,
    #[error("a message before QueueStart")]
    BeforeStart,
    #[error("message id {0} sent again before it was acknowledged")]
    IdReused(u64),
}

/// What the pusher's driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum PushStep<M> {
    /// Read message `id` ([`PushSession::message`]) and send it with its
    /// data (or report it [`PushSession::unreadable`]).
    Send(u64),
    /// Close the window: the new primary commits what it staged.
    Barrier(u64),
    /// The new primary holds this message: remove the local copy.
    Delete(M),
    /// Everything is acknowledged: make the removals durable, then send
    /// the end.
    End,
}

/// Where a push stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushPhase {
    Streaming,
    /// The end is sent; waiting for its acknowledgement.
    Ending,
    Ended,
}

/// What a push did, by message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushCounts {
    pub sent: u64,
    pub ingested: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub unreadable: u64,
}

/// The former primary's side of one push.
#[derive(Debug)]
pub struct PushSession<M> {
    unsent: VecDeque<M>,
    inflight: VecDeque<(u64, M)>,
    deletes: VecDeque<M>,
    next_id: u64,
    /// Messages per window ([`WINDOW`]).
    window: usize,
    /// Messages opened in the current window; a window opens only while
    /// at most one window is outstanding, and is then filled whole.
    in_window: usize,
    window_open: bool,
    /// Sent since the last barrier.
    unflushed: bool,
    phase: PushPhase,
    pub counts: PushCounts,
}

impl<M> PushSession<M> {
    pub fn new(messages: impl IntoIterator<Item = M>) -> Self {
        Self::with_window(messages, WINDOW)
    }

    /// With windows of `window` messages (the simulator's small ones).
    pub fn with_window(messages: impl IntoIterator<Item = M>, window: usize) -> Self {
        PushSession {
            unsent: messages.into_iter().collect(),
            inflight: VecDeque::new(),
            deletes: VecDeque::new(),
            next_id: 0,
            window: window.max(1),
            in_window: 0,
            window_open: false,
            unflushed: false,
            phase: PushPhase::Streaming,
            counts: PushCounts::default(),
        }
    }

    pub fn phase(&self) -> PushPhase {
        self.phase
    }

    /// The message sent (or to send) as `id`.
    pub fn message(&self, id: u64) -> Option<&M> {
        self.inflight.iter().find(|(i, _)| *i == id).map(|(_, m)| m)
    }

    /// The next thing to do; `None`: wait for the peer's next frame (or,
    /// once [`PushPhase::Ended`], nothing is left).
    pub fn poll(&mut self) -> Option<PushStep<M>> {
        if let Some(m) = self.deletes.pop_front() {
            return Some(PushStep::Delete(m));
        }
        if self.phase != PushPhase::Streaming {
            return None;
        }
        // Whole windows: the new primary commits each as one batch (one
        // flush for all of it); refilling one slot per ack would make every
        // later batch a batch of one. Two windows outstanding overlap
        // reading and sending the next with the peer's commit of this one.
        if self.in_window == 0 && self.inflight.len() <= self.window {
            self.window_open = true;
        }
        if self.window_open && self.in_window < self.window {
            if let Some(m) = self.unsent.pop_front() {
                self.next_id += 1;
                self.in_window += 1;
                self.inflight.push_back((self.next_id, m));
                return Some(PushStep::Send(self.next_id));
            }
        }
        self.window_open = false;
        self.in_window = 0;
        if self.unflushed {
            self.unflushed = false;
            return Some(PushStep::Barrier(self.next_id));
        }
        if self.inflight.is_empty() && self.unsent.is_empty() {
            self.phase = PushPhase::Ending;
            return Some(PushStep::End);
        }
        None
    }

    /// Message `id` could not be read: it stays in place, unsent (its
    /// frames were not sent).
    pub fn unreadable(&mut self, id: u64) -> Option<M> {
        let pos = self.inflight.iter().rposition(|(i, _)| *i == id)?;
        self.counts.unreadable += 1;
        self.inflight.remove(pos).map(|(_, m)| m)
    }

    /// Message `id` was sent, with all its data.
    pub fn sent(&mut self, _id: u64) {
        self.counts.sent += 1;
        self.unflushed = true;
    }

    /// The peer's acknowledgement of message `id`. A refused message is
    /// returned (it stays in place); an ingested or duplicate one is
    /// handed out for deletion by [`poll`](Self::poll).
    pub fn on_ack(&mut self, id: u64, outcome: QueueOutcome) -> Result<Option<M>, Violation> {
        if self.phase != PushPhase::Streaming {
            return Err(Violation::AckAfterEnd);
        }
        let pos = self
            .inflight
            .iter()
            .position(|(i, _)| *i == id)
            .ok_or(Violation::UnknownAck(id))?;
        let (_, m) = self.inflight.remove(pos).expect("position is valid");
        match outcome {
            QueueOutcome::Ingested | QueueOutcome::Duplicate => {
                if outcome == QueueOutcome::Ingested {
                    self.counts.ingested += 1;
                } else {
                    self.counts.duplicates += 1;
                }
                self.deletes.push_back(m);
                Ok(None)
            }
            QueueOutcome::Refused => {
                self.counts.refused += 1;
                Ok(Some(m))
            }
        }
    }

    /// The peer acknowledged the end.
    pub fn on_end_ack(&mut self) -> Result<(), Violation> {
        if self.phase != PushPhase::Ending {
            return Err(Violation::EarlyEnd);
        }
        self.phase = PushPhase::Ended;
        Ok(())
    }
}

/// What the ingester's driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestStep {
    /// Commit these staged messages (by push id) as one batch, durably,
    /// then report [`IngestSession::committed`].
    Commit(Vec<u64>),
    /// Tell the pusher the outcome of message `id`.
    Ack {
        id: u64,
        outcome: QueueOutcome,
        detail: String,
    },
    /// Every message is acknowledged: run the post-ingest hook if anything
    /// landed, then acknowledge the end.
    Finish { landed_any: bool },
}

/// Where an ingest stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestPhase {
    AwaitingStart,
    Streaming,
    /// The end came; committing and acknowledging what is left.
    Ending,
    Ended,
}

/// Whether a pushed message is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Stage it, then report [`IngestSession::staged`] (or
    /// [`IngestSession::refused`]).
    Stage,
    /// Held already: acknowledged as a duplicate.
    Duplicate,
}

/// The new primary's side of one push.
#[derive(Debug)]
pub struct IngestSession {
    phase: IngestPhase,
    /// Most messages committed together ([`INGEST_BATCH`]).
    batch_max: usize,
    /// Staged, waiting for the next commit: (push id, identity).
    batch: Vec<(u64, u128)>,
    /// The batch whose commit runs.
    committing: Option<Vec<(u64, u128)>>,
    /// Identities staged or committing, not yet acknowledged.
    pending_keys: HashSet<u128>,
    /// Push ids staged or committing, not yet acknowledged.
    pending_ids: HashSet<u64>,
    landed_any: bool,
    out: VecDeque<IngestStep>,
}

impl Default for IngestSession {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestSession {
    pub fn new() -> Self {
        Self::with_batch(INGEST_BATCH)
    }

    /// With batches of at most `batch` messages (and 4 × `batch` staged
    /// unacknowledged at most; the simulator's small ones).
    pub fn with_batch(batch: usize) -> Self {
        IngestSession {
            phase: IngestPhase::AwaitingStart,
            batch_max: batch.max(1),
            batch: Vec::new(),
            committing: None,
            pending_keys: HashSet::new(),
            pending_ids: HashSet::new(),
            landed_any: false,
            out: VecDeque::new(),
        }
    }

    pub fn phase(&self) -> IngestPhase {
        self.phase
    }

    /// Whether a commit is running.
    pub fn committing(&self) -> bool {
        self.committing.is_some()
    }

    /// The push began (its epoch and layout checked by the driver).
    pub fn started(&mut self) {
        if self.phase == IngestPhase::AwaitingStart {
            self.phase = IngestPhase::Streaming;
        }
    }

    /// A message `id` of identity `key` arrived whole and intact; `held`:
    /// this node holds that identity already (ledger or live queue).
    pub fn on_message(&mut self, id: u64, key: u128, held: bool) -> Result<Admit, Violation> {
        self.expect_streaming()?;
        if self.pending_ids.contains(&id) {
            return Err(Violation::IdReused(id));
        }
        if held || self.pending_keys.contains(&key) {
            self.ack(id, QueueOutcome::Duplicate, "already ingested".into());
            return Ok(Admit::Duplicate);
        }
        Ok(Admit::Stage)
    }

    /// Message `id` could not be taken (its driver says why): the pusher
    /// keeps it.
    pub fn refused(&mut self, id: u64, detail: String) -> Result<(), Violation> {
        self.expect_streaming()?;
        if self.pending_ids.contains(&id) {
            return Err(Violation::IdReused(id));
        }
        self.ack(id, QueueOutcome::Refused, detail);
        Ok(())
    }

    /// Message `id` is staged (written, not yet durable).
    pub fn staged(&mut self, id: u64, key: u128) -> Result<(), Violation> {
        self.expect_streaming()?;
        if !self.pending_ids.insert(id) {
            return Err(Violation::IdReused(id));
        }
        self.pending_keys.insert(key);
        self.batch.push((id, key));
        if self.batch.len() > 4 * self.batch_max {
            return Err(Violation::TooManyUnacked(4 * self.batch_max));
        }
        if self.batch.len() >= self.batch_max {
            self.start_commit();
        }
        Ok(())
    }

    /// The pusher closed a window.
    pub fn on_barrier(&mut self) -> Result<(), Violation> {
        self.expect_streaming()?;
        self.start_commit();
        Ok(())
    }

    /// The pusher sent the end.
    pub fn on_end(&mut self) -> Result<(), Violation> {
        self.expect_streaming()?;
        self.phase = IngestPhase::Ending;
        self.start_commit();
        self.maybe_finish();
        Ok(())
    }

    /// The running commit ended: `Ok` if its messages are durable in the
    /// queue (and counted in the ledger), else why not (nothing of it
    /// counts; the pusher keeps its copies).
    pub fn committed(&mut self, result: Result<(), String>) {
        let batch = self.committing.take().unwrap_or_default();
        for (id, key) in &batch {
            self.pending_keys.remove(key);
            self.pending_ids.remove(id);
        }
        self.landed_any |= result.is_ok() && !batch.is_empty();
        for (id, _) in batch {
            match &result {
                Ok(()) => self.ack(id, QueueOutcome::Ingested, String::new()),
                Err(e) => self.ack(id, QueueOutcome::Refused, e.clone()),
            }
        }
        self.start_commit();
        self.maybe_finish();
    }

    /// The next thing to do; `None`: wait for a frame or a commit.
    pub fn poll(&mut self) -> Option<IngestStep> {
        self.out.pop_front()
    }

    fn expect_streaming(&self) -> Result<(), Violation> {
        match self.phase {
            IngestPhase::Streaming => Ok(()),
            IngestPhase::AwaitingStart => Err(Violation::BeforeStart),
            IngestPhase::Ending | IngestPhase::Ended => Err(Violation::AfterEnd),
        }
    }

    fn ack(&mut self, id: u64, outcome: QueueOutcome, detail: String) {
        self.out.push_back(IngestStep::Ack {
            id,
            outcome,
            detail,
        });
    }

    /// Starts committing what is staged, unless a commit runs: what is
    /// staged meanwhile goes with the next one, started as that one ends.
    fn start_commit(&mut self) {
        if self.committing.is_some() || self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.out.push_back(IngestStep::Commit(
            batch.iter().map(|(id, _)| *id).collect(),
        ));
        self.committing = Some(batch);
    }

    fn maybe_finish(&mut self) {
        if self.phase == IngestPhase::Ending && self.committing.is_none() && self.batch.is_empty() {
            self.phase = IngestPhase::Ended;
            self.out.push_back(IngestStep::Finish {
                landed_any: self.landed_any,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every step until the pusher waits, each message sent as asked.
    fn drain<M>(p: &mut PushSession<M>) -> Vec<PushStep<M>> {
        std::iter::from_fn(|| {
            let step = p.poll()?;
            if let PushStep::Send(id) = step {
                p.sent(id);
            }
            Some(step)
        })
        .collect()
    }

    #[test]
    fn a_pusher_sends_whole_windows_and_deletes_only_what_the_peer_holds() {
        let w = WINDOW as u64;
        let mut p = PushSession::new(0..(w as u32 * 2 + 3));
        let steps = drain(&mut p);
        // Two windows, each closed by a barrier, then a wait.
        assert_eq!(steps.len(), 2 * WINDOW + 2);
        assert_eq!(steps[WINDOW], PushStep::Barrier(w));
        assert_eq!(steps.last(), Some(&PushStep::Barrier(2 * w)));
        assert_eq!(p.on_ack(1, QueueOutcome::Refused), Ok(Some(0)));
        assert_eq!(p.on_ack(2, QueueOutcome::Duplicate), Ok(None));
        // No window opens while more than one is outstanding.
        assert_eq!(drain(&mut p), vec![PushStep::Delete(1)]);
        for id in 3..=w {
            p.on_ack(id, QueueOutcome::Ingested).unwrap();
        }
        let steps = drain(&mut p);
        assert_eq!(steps.len() as u64, w - 2 + 4);
        assert!(steps[..steps.len() - 4]
            .iter()
            .all(|s| matches!(s, PushStep::Delete(_))));
        assert_eq!(
            steps[steps.len() - 4..],
            [
                PushStep::Send(2 * w + 1),
                PushStep::Send(2 * w + 2),
                PushStep::Send(2 * w + 3),
                PushStep::Barrier(2 * w + 3),
            ]
        );
        assert_eq!(
            p.on_ack(3, QueueOutcome::Ingested),
            Err(Violation::UnknownAck(3))
        );
        for id in w + 1..=2 * w + 3 {
            p.on_ack(id, QueueOutcome::Ingested).unwrap();
        }
        let steps = drain(&mut p);
        assert_eq!(steps.last(), Some(&PushStep::End));
        assert_eq!(steps.len() as u64, w + 3 + 1);
        assert_eq!(
            p.on_ack(4, QueueOutcome::Ingested),
            Err(Violation::AckAfterEnd)
        );
        p.on_end_ack().unwrap();
        assert_eq!(p.phase(), PushPhase::Ended);
        assert_eq!(p.counts.refused, 1);
        assert_eq!(p.counts.duplicates, 1);
    }

    #[test]
    fn an_unreadable_message_stays_and_the_push_still_ends() {
        let mut p = PushSession::new(["a", "b", "c"]);
        assert_eq!(p.poll(), Some(PushStep::Send(1)));
        assert_eq!(p.unreadable(1), Some("a"));
        assert_eq!(
            drain(&mut p),
            vec![PushStep::Send(2), PushStep::Send(3), PushStep::Barrier(3)]
        );
        p.on_ack(2, QueueOutcome::Ingested).unwrap();
        p.on_ack(3, QueueOutcome::Ingested).unwrap();
        assert_eq!(
            drain(&mut p),
            vec![PushStep::Delete("b"), PushStep::Delete("c"), PushStep::End]
        );
        assert_eq!(p.on_end_ack(), Ok(()));
        assert_eq!(p.counts.unreadable, 1);
    }

    /// A window of messages none of which could be read sends no barrier.
    #[test]
    fn a_window_of_unreadable_messages_sends_no_barrier() {
        let mut p = PushSession::new(["a"]);
        assert_eq!(p.poll(), Some(PushStep::Send(1)));
        p.unreadable(1);
        assert_eq!(p.poll(), Some(PushStep::End));
    }

    #[test]
    fn an_ingester_acks_a_batch_only_when_its_commit_reports() {
        let mut s = IngestSession::new();
        assert_eq!(s.on_message(1, 10, false), Err(Violation::BeforeStart));
        s.started();
        assert_eq!(s.on_message(1, 10, false), Ok(Admit::Stage));
        s.staged(1, 10).unwrap();
        // The same identity again while it is staged: a duplicate.
        assert_eq!(s.on_message(2, 10, false), Ok(Admit::Duplicate));
        assert_eq!(s.on_message(3, 11, true), Ok(Admit::Duplicate));
        s.on_barrier().unwrap();
        let steps: Vec<_> = std::iter::from_fn(|| s.poll()).collect();
        assert!(matches!(
            &steps[0],
            IngestStep::Ack {
                id: 2,
                outcome: QueueOutcome::Duplicate,
                ..
            }
        ));
        assert!(matches!(
            &steps[1],
            IngestStep::Ack {
                id: 3,
                outcome: QueueOutcome::Duplicate,
                ..
            }
        ));
        assert_eq!(steps[2], IngestStep::Commit(vec![1]));
        // Staged while the commit runs: waits for it.
        assert_eq!(s.on_message(4, 12, false), Ok(Admit::Stage));
        s.staged(4, 12).unwrap();
        s.on_end().unwrap();
        assert_eq!(s.poll(), None);
        s.committed(Err("flush failed".into()));
        let steps: Vec<_> = std::iter::from_fn(|| s.poll()).collect();
        assert!(matches!(
            &steps[0],
            IngestStep::Ack {
                id: 1,
                outcome: QueueOutcome::Refused,
                ..
            }
        ));
        assert_eq!(steps[1], IngestStep::Commit(vec![4]));
        assert_eq!(steps.len(), 2);
        s.committed(Ok(()));
        let steps: Vec<_> = std::iter::from_fn(|| s.poll()).collect();
        assert!(matches!(
            &steps[0],
            IngestStep::Ack {
                id: 4,
                outcome: QueueOutcome::Ingested,
                ..
            }
        ));
        assert_eq!(steps[1], IngestStep::Finish { landed_any: true });
        assert_eq!(s.phase(), IngestPhase::Ended);
        assert_eq!(s.on_barrier(), Err(Violation::AfterEnd));
    }

    /// Found by review: a second message under an id still staged would
    /// take the first one's place in the driver's table, and both be
    /// acknowledged for one landed message.
    #[test]
    fn an_id_sent_again_before_its_acknowledgement_is_a_violation() {
        let mut s = IngestSession::new();
        s.started();
        assert_eq!(s.on_message(5, 50, false), Ok(Admit::Stage));
        s.staged(5, 50).unwrap();
        assert_eq!(s.on_message(5, 51, false), Err(Violation::IdReused(5)));
        assert_eq!(s.staged(5, 51), Err(Violation::IdReused(5)));
        // Refused under that id (a second review): its ack would have taken
        // the staged message's place.
        assert_eq!(s.refused(5, "bad".into()), Err(Violation::IdReused(5)));
        s.on_barrier().unwrap();
        assert_eq!(s.poll(), Some(IngestStep::Commit(vec![5])));
        s.committed(Ok(()));
        assert_eq!(s.on_message(5, 52, false), Ok(Admit::Stage));
    }

    #[test]
    fn an_ingester_refuses_more_than_it_may_hold_unacknowledged() {
        let mut s = IngestSession::new();
        s.started();
        // One commit runs and is never reported: the rest piles up.
        let mut err = None;
        for id in 0..(UNACKED_MESSAGES_MAX as u64 + INGEST_BATCH as u64 + 2) {
            if let Err(e) = s.staged(id, u128::from(id)) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(Violation::TooManyUnacked(UNACKED_MESSAGES_MAX)));
    }
}
