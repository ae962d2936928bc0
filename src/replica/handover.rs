//! The hand-over of kept-aside versions from a former primary to the
//! primary, on the replica's side: which version goes next, which are on
//! their way, and which the primary acknowledged (their copy here may go):
//! decisions only.
//!
//! A version the replica keeps aside (a genuine conflict) is handed over in
//! the session that kept it; one kept in an earlier session and not
//! acknowledged (the session ended first, or the node restarted) is listed
//! again from the conflicts directory as the next session opens and handed
//! over again. One the primary did not acknowledge within
//! [`ACK_WAIT`] (it could not keep it: its disk full or failing; or it is
//! very slow) is handed over again in the same session, and the wait
//! doubles while no acknowledgement comes (up to 16 times). The primary
//! keeps a version handed over twice once and acknowledges both. The copy
//! here is removed only once acknowledged.
//!
//! The receiver performs what this decides (reading the files, sending
//! `ConflictFile` and `Data`, removing the copies); the data-path simulator
//! runs the same decisions over its model of the conflicts directory.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a version handed over waits for its acknowledgement before it
/// is handed over again in the same session. The primary acknowledges once
/// the version is durable (a file and two flushes); one that could not keep
/// it acknowledges nothing and logs why.
pub const ACK_WAIT: Duration = Duration::from_secs(60);

/// The wait doubles after each hand-over again that no acknowledgement
/// followed, this many times at most (60 s → 16 min): a primary whose disk
/// stays full is not sent every version every minute.
const ACK_WAIT_DOUBLINGS_MAX: u32 = 4;

/// A replica's hand-over of the versions it keeps aside (`V`: what names
/// one of them, with the store it belongs to).
#[derive(Debug)]
pub struct HandOver<V> {
    queued: VecDeque<V>,
    /// Sent under the hand-over's number, not yet acknowledged, and when:
    /// numbers go out in order, so the first is the oldest.
    sent: BTreeMap<u64, (V, Instant)>,
    next_id: u64,
    ack_wait: Duration,
    /// Hand-overs again since the last acknowledgement.
    misses: u32,
}

impl<V> Default for HandOver<V> {
    fn default() -> Self {
        HandOver::new(ACK_WAIT)
    }
}

impl<V> HandOver<V> {
    /// Unacknowledged versions go again after `ack_wait` ([`ACK_WAIT`]
    /// but in tests).
    pub fn new(ack_wait: Duration) -> Self {
        HandOver {
            queued: VecDeque::new(),
            sent: BTreeMap::new(),
            next_id: 1,
            ack_wait,
            misses: 0,
        }
    }

    /// A session opens: what the last one had on its way is forgotten (its
    /// acknowledgements cannot arrive any more); every version still kept
    /// here (`listed`) is handed over in this one.
    pub fn begin_session(&mut self, listed: impl IntoIterator<Item = V>) {
        self.end_session();
        self.queued.extend(listed);
    }

    /// The session ended: nothing goes out, and nothing is due, until the
    /// next one opens (its `Start` admitted) and lists what is still kept.
    pub fn end_session(&mut self) {
        self.sent.clear();
        self.queued.clear();
        self.misses = 0;
    }

    /// A version was kept aside in this session.
    pub fn kept(&mut self, version: V) {
        self.queued.push_back(version);
    }

    /// The next version to hand over, with the number it goes under. The
    /// caller reports it [`HandOver::sent`]; one it cannot send (its file
    /// gone or unreadable) it drops, and the next session lists it again if
    /// it is still there.
    pub fn next_to_send(&mut self) -> Option<(u64, V)> {
        let v = self.queued.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        Some((id, v))
    }

    /// Version `id` went out whole at `now` (in the order of their numbers,
    /// as [`HandOver::next_to_send`] gave them): it waits for the
    /// acknowledgement.
    pub fn sent(&mut self, id: u64, version: V, now: Instant) {
        self.sent.insert(id, (version, now));
    }

    /// The primary acknowledged `id` (it keeps that version durably): the
    /// version whose copy here may be removed now. `None` for a number not
    /// on its way in this session (one handed over again since: its new
    /// number's acknowledgement follows).
    pub fn acked(&mut self, id: u64) -> Option<V> {
        let (v, _) = self.sent.remove(&id)?;
        self.misses = 0;
        Some(v)
    }

    /// How long a version handed over now waits for its acknowledgement:
    /// [`ACK_WAIT`] (shorter in tests), doubled for each hand-over again
    /// since the last acknowledgement.
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait * 2u32.pow(self.misses.min(ACK_WAIT_DOUBLINGS_MAX))
    }

    /// When the oldest unacknowledged version is due to go again.
    pub fn resend_at(&self) -> Option<Instant> {
        let (_, (_, at)) = self.sent.first_key_value()?;
        Some(*at + self.ack_wait())
    }

    /// Versions unacknowledged for the wait ([`HandOver::ack_wait`]) at
    /// `now` go back to the front of the queue, in the order they were
    /// sent, to be handed over again under new numbers; how many.
    pub fn requeue_unacked(&mut self, now: Instant) -> usize {
        let wait = self.ack_wait();
        let mut due = Vec::new();
        while let Some(entry) = self.sent.first_entry() {
            if entry.get().1 + wait > now {
                break;
            }
            due.push(entry.remove().0);
        }
        let n = due.len();
        for v in due.into_iter().rev() {
            self.queued.push_front(v);
        }
        if n > 0 {
            self.misses = self.misses.saturating_add(1);
        }
        n
    }

    /// The primary refused `id` (it could not keep it): the version, which
    /// stays on its way and goes again when its wait is over (a full disk
    /// is not freed at once). `None` for a number not on its way.
    pub fn refused(&self, id: u64) -> Option<&V> {
        self.sent.get(&id).map(|(v, _)| v)
    }

    /// Whether any version is still to send or sent and unacknowledged.
    pub fn handing_over(&self) -> bool {
        !self.queued.is_empty() || !self.sent.is_empty()
    }

    /// Whether any version waits to be sent.
    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_go_out_in_order_under_distinct_numbers_and_leave_when_acknowledged() {
        let mut h = HandOver::default();
        assert!(!h.handing_over());
        h.begin_session(["listed"]);
        h.kept("kept");
        assert!(h.has_queued());
        let (a, va) = h.next_to_send().unwrap();
        let (b, vb) = h.next_to_send().unwrap();
        assert_eq!((va, vb), ("listed", "kept"));
        assert_ne!(a, b);
        assert!(h.next_to_send().is_none());
        let t = Instant::now();
        h.sent(a, va, t);
        h.sent(b, vb, t);
        assert!(h.handing_over() && !h.has_queued());
        assert_eq!(h.acked(b), Some("kept"));
        assert_eq!(h.acked(b), None, "once");
        assert_eq!(h.acked(99), None, "a number never sent");
        assert!(h.handing_over(), "one still unacknowledged");
        assert_eq!(h.acked(a), Some("listed"));
        assert!(!h.handing_over());
    }

    #[test]
    fn a_new_session_forgets_what_was_on_its_way_and_numbers_afresh() {
        let mut h = HandOver::default();
        h.begin_session(["a", "b"]);
        let t = Instant::now();
        let (id, v) = h.next_to_send().unwrap();
        h.sent(id, v, t);
        // The session ends unacknowledged; the next lists what is still kept.
        h.begin_session(["a", "b"]);
        assert_eq!(h.acked(id), None, "an acknowledgement of the old session");
        let (again, v) = h.next_to_send().unwrap();
        assert_eq!(v, "a");
        assert!(again > id, "numbers are not reused");
        h.sent(again, v, t);
        h.next_to_send().unwrap();
        assert!(h.handing_over());
    }

    #[test]
    fn a_version_unacknowledged_too_long_goes_again_under_a_new_number() {
        let mut h = HandOver::default();
        let t = Instant::now();
        h.begin_session(["a", "b", "c"]);
        let (a, va) = h.next_to_send().unwrap();
        h.sent(a, va, t);
        let (b, vb) = h.next_to_send().unwrap();
        h.sent(b, vb, t + Duration::from_secs(5));
        assert_eq!(h.resend_at(), Some(t + ACK_WAIT), "the oldest first");
        assert_eq!(
            h.requeue_unacked(t + ACK_WAIT - Duration::from_millis(1)),
            0
        );
        assert_eq!(h.requeue_unacked(t + ACK_WAIT), 1, "only the one due");
        assert_eq!(
            h.resend_at(),
            Some(t + Duration::from_secs(5) + 2 * ACK_WAIT),
            "the wait doubled: no acknowledgement came"
        );
        // Before what was never sent, then new numbers.
        let (a2, v) = h.next_to_send().unwrap();
        assert_eq!(v, "a");
        assert!(a2 > b);
        assert_eq!(h.next_to_send().unwrap().1, "c");
        // The old number's late acknowledgement names nothing any more;
        // the new one's does.
        assert_eq!(h.acked(a), None);
        h.sent(a2, v, t + ACK_WAIT);
        assert_eq!(h.acked(a2), Some("a"));
        assert_eq!(h.ack_wait(), ACK_WAIT, "an acknowledgement came");
        assert_eq!(h.acked(b), Some("b"));
        assert_eq!(h.resend_at(), None);
    }

    #[test]
    fn the_wait_doubles_while_nothing_is_acknowledged_up_to_a_bound() {
        let mut h = HandOver::new(Duration::from_secs(1));
        let mut now = Instant::now();
        h.begin_session(["a"]);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let (id, v) = h.next_to_send().unwrap();
            h.sent(id, v, now);
            waits.push(h.ack_wait().as_secs());
            now = h.resend_at().unwrap();
            assert_eq!(h.requeue_unacked(now), 1);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 16, 16]);
        // A session's end forgets it all: nothing is due before the next
        // session's `Start` lists what is kept.
        h.end_session();
        assert!(!h.handing_over() && h.resend_at().is_none());
        assert_eq!(h.ack_wait(), Duration::from_secs(1));
    }
}
