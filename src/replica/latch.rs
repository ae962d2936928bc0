//! The replica's unverified latch, sans-IO: after a flush on the replica
//! failed, what its index says about the disk is not trusted until a
//! manifest has re-read every file from disk, and no batch is acknowledged
//! meanwhile. The receiver keeps the latch across restarts (a marker in its
//! state directory) and does the I/O; the data-path simulator drives the
//! same type over its model.
//!
//! A flush can also fail with nobody waiting for it: its session ended
//! while it ran (the link was cut), and the durable-commit thread keeps the
//! failure for whoever asks next. That "orphaned" failure counts as soon as
//! it is seen: before a manifest it latches (so that the manifest re-reads
//! the disk), and at the next flush it fails that flush too.

use super::index::Rehash;
use super::manifest::rehash_for;

/// The latch of one receiving session.
#[derive(Debug, Default)]
pub struct Latch {
    /// Why the replica is unverified, if it is.
    reason: Option<String>,
    /// Barriers made durable while unverified: acknowledged only once the
    /// replica was re-read.
    held: Vec<u64>,
}

/// The latch was set.
#[derive(Debug, PartialEq, Eq)]
pub struct Latched {
    /// What to record (and show) as the reason.
    pub reason: String,
    /// It was not latched before: raise the alarm.
    pub new: bool,
}

/// The latch lifted.
#[derive(Debug, PartialEq, Eq)]
pub struct Lifted {
    /// Why it had been latched.
    pub reason: String,
    /// The acknowledgements held meanwhile, to send now, in order.
    pub acks: Vec<u64>,
}

impl Latch {
    /// A session starts latched for `reason` (the state directory's marker,
    /// or an earlier session of this process whose marker could not be
    /// written), or not. Acknowledgements held by an earlier session went
    /// with its connection.
    pub fn resume(reason: Option<String>) -> Latch {
        Latch {
            reason,
            held: Vec::new(),
        }
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub fn is_set(&self) -> bool {
        self.reason.is_some()
    }

    /// A flush failed (`why`): latched until the next full re-read.
    pub fn set(&mut self, why: &str) -> Latched {
        let reason = format!("a flush failed: {why}");
        let new = self.reason.is_none();
        self.reason = Some(reason.clone());
        Latched { reason, new }
    }

    /// The outcome of the flush that just reported, counting a failure of
    /// an earlier one that nobody waited for: what that flush covered may
    /// be landed and lost, so this one cannot vouch for it.
    pub fn flush_outcome(res: Result<(), String>, orphan: Option<String>) -> Result<(), String> {
        match (res, orphan) {
            (Ok(()), Some(orphan)) => Err(format!("an earlier flush failed: {orphan}")),
            (res, _) => res,
        }
    }

    /// A manifest is asked for (`full_verify`: every file re-hashed): an
    /// orphaned failure seen now latches first; then how the manifest
    /// re-hashes, and the latching to record, if any.
    pub fn manifest(
        &mut self,
        full_verify: bool,
        orphan: Option<String>,
    ) -> (Rehash, Option<Latched>) {
        let latched = orphan.map(|o| self.set(&format!("an earlier flush failed: {o}")));
        (rehash_for(self.is_set(), full_verify), latched)
    }

    /// A barrier is durable: `Some(seq)` to acknowledge now, `None` while
    /// unverified (held until [`Latch::manifest_sent`]).
    pub fn ack(&mut self, seq: u64) -> Option<u64> {
        if self.is_set() {
            self.held.push(seq);
            None
        } else {
            Some(seq)
        }
    }

    /// A manifest listed with `rehash` was sent whole: if it re-read every
    /// file from disk, the latch lifts and the held acknowledgements go.
    pub fn manifest_sent(&mut self, rehash: Rehash) -> Option<Lifted> {
        if rehash != Rehash::FromDisk {
            return None;
        }
        let reason = self.reason.take()?;
        Some(Lifted {
            reason,
            acks: std::mem::take(&mut self.held),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_wait_for_a_reread_from_disk() {
        let mut l = Latch::resume(None);
        assert_eq!(l.ack(1), Some(1));
        let set = l.set("EIO");
        assert!(set.new);
        assert!(!l.set("EIO again").new);
        assert_eq!(l.ack(2), None);
        assert_eq!(l.ack(3), None);
        // A manifest that trusts the index does not lift it.
        assert_eq!(l.manifest_sent(Rehash::Changed), None);
        assert_eq!(l.manifest_sent(Rehash::All), None);
        assert_eq!(l.ack(4), None);
        let (rehash, latched) = l.manifest(false, None);
        assert_eq!(rehash, Rehash::FromDisk);
        assert_eq!(latched, None);
        let lifted = l.manifest_sent(rehash).expect("lifted");
        assert_eq!(lifted.acks, vec![2, 3, 4]);
        assert!(lifted.reason.contains("EIO again"));
        assert_eq!(l.ack(5), Some(5));
    }

    #[test]
    fn an_orphaned_failure_latches_before_a_manifest_and_fails_the_next_flush() {
        let mut l = Latch::resume(None);
        let (rehash, latched) = l.manifest(true, Some("EIO".into()));
        assert_eq!(rehash, Rehash::FromDisk);
        assert!(latched.expect("latched").new);
        assert!(Latch::flush_outcome(Ok(()), Some("EIO".into())).is_err());
        assert_eq!(Latch::flush_outcome(Ok(()), None), Ok(()));
        assert_eq!(
            Latch::flush_outcome(Err("ENOSPC".into()), Some("EIO".into())),
            Err("ENOSPC".into())
        );
        // Not latched, the manifest's mode is the one asked for.
        let mut l = Latch::resume(None);
        assert_eq!(l.manifest(true, None), (Rehash::All, None));
        assert_eq!(l.manifest(false, None), (Rehash::Changed, None));
    }

    #[test]
    fn a_session_resumes_latched_without_the_held_acknowledgements() {
        let mut l = Latch::resume(Some("a flush failed: EIO".into()));
        assert_eq!(l.ack(7), None);
        let mut next = Latch::resume(l.reason().map(str::to_owned));
        assert!(next.is_set());
        let lifted = next.manifest_sent(Rehash::FromDisk).expect("lifted");
        assert!(lifted.acks.is_empty());
    }
}
