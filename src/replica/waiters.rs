//! Zero-loss commits waiting for the peer: each waits until a batch that
//! carries its path is acknowledged, and returns local-only at its deadline.
//!
//! Sans-IO: the sender says which batch carries which paths
//! ([`CommitWaiters::ride`]), what the peer acknowledged
//! ([`CommitWaiters::acked`]) and what time it is; the requests handed back
//! are answered by the caller.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a zero-loss commit learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Durable on the peer too.
    Replicated { waited: Duration },
    /// Durable here only: the peer did not confirm in time (or this node is
    /// not primary). Like semi-synchronous replication, the pair degrades
    /// instead of blocking mail.
    LocalOnly { reason: String },
}

/// A pending `Engine::commit`.
#[derive(Debug)]
pub struct CommitReq {
    pub store: usize,
    pub rel: PathBuf,
    pub at: Instant,
    pub deadline: Instant,
    pub reply: tokio::sync::oneshot::Sender<CommitOutcome>,
}

/// Commits waiting, each with the barrier of the batch that carries its
/// path once one does.
#[derive(Debug, Default)]
pub struct CommitWaiters {
    waiting: Vec<(CommitReq, Option<u64>)>,
}

impl CommitWaiters {
    /// A commit starts waiting (its path is not yet in any batch).
    pub fn add(&mut self, req: CommitReq) {
        self.waiting.push((req, None));
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The batch closed by `barrier` carries the paths `carries` says yes
    /// to: commits on them not yet riding a batch ride this one.
    pub fn ride(&mut self, barrier: u64, carries: impl Fn(usize, &Path) -> bool) {
        for (req, b) in self.waiting.iter_mut() {
            if b.is_none() && carries(req.store, &req.rel) {
                *b = Some(barrier);
            }
        }
    }

    /// Commits replicated by an ack up to `seq`.
    pub fn acked(&mut self, seq: u64) -> Vec<CommitReq> {
        self.take(|_, b| b.is_some_and(|b| b <= seq))
    }

    /// Commits on a path the peer already holds exactly as it is here
    /// (nothing to send): replicated now.
    pub fn held_already(&mut self, store: usize, rel: &Path) -> Vec<CommitReq> {
        self.take(|r, b| b.is_none() && r.store == store && r.rel == rel)
    }

    /// Commits past their deadline at `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<CommitReq> {
        self.take(|r, _| r.deadline <= now)
    }

    /// The connection was lost with the batches in flight: every commit
    /// waits for its path to be sent again.
    pub fn connection_lost(&mut self) {
        for (_, b) in self.waiting.iter_mut() {
            *b = None;
        }
    }

    fn take(&mut self, done: impl Fn(&CommitReq, Option<u64>) -> bool) -> Vec<CommitReq> {
        let (out, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(r, b)| done(r, *b));
        self.waiting = rest;
        out.into_iter().map(|(r, _)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(rel: &str, at: Instant, within: Duration) -> CommitReq {
        let (reply, _rx) = tokio::sync::oneshot::channel();
        CommitReq {
            store: 0,
            rel: rel.into(),
            at,
            deadline: at + within,
            reply,
        }
    }

    fn names(v: &[CommitReq]) -> Vec<String> {
        v.iter().map(|r| r.rel.display().to_string()).collect()
    }

    #[test]
    fn a_commit_is_replicated_by_the_ack_of_the_batch_that_carries_its_path() {
        let t = Instant::now();
        let mut w = CommitWaiters::default();
        w.add(req("q/a", t, Duration::from_secs(1)));
        w.add(req("q/b", t, Duration::from_secs(1)));
        w.ride(10, |_, p| p == Path::new("q/a"));
        assert!(w.acked(9).is_empty(), "an earlier batch's ack");
        w.ride(20, |_, _| true);
        assert_eq!(names(&w.acked(10)), ["q/a"]);
        w.ride(30, |_, _| true);
        assert_eq!(
            names(&w.acked(25)),
            ["q/b"],
            "rides the first batch that carries it"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_lost_connection_makes_commits_wait_for_the_resend() {
        let t = Instant::now();
        let mut w = CommitWaiters::default();
        w.add(req("q/a", t, Duration::from_secs(1)));
        w.ride(10, |_, _| true);
        w.connection_lost();
        // The new session numbers on: an ack of a batch that does not carry
        // the path replicates nothing.
        assert!(w.acked(10).is_empty());
        w.ride(40, |_, _| true);
        assert_eq!(names(&w.acked(40)), ["q/a"]);
    }

    #[test]
    fn deadlines_and_paths_already_held() {
        let t = Instant::now();
        let mut w = CommitWaiters::default();
        w.add(req("q/a", t, Duration::from_millis(100)));
        w.add(req("q/b", t, Duration::from_millis(300)));
        w.add(req("q/c", t, Duration::from_millis(300)));
        assert_eq!(names(&w.held_already(0, Path::new("q/c"))), ["q/c"]);
        assert!(
            w.held_already(1, Path::new("q/b")).is_empty(),
            "another store"
        );
        assert!(w.expired(t + Duration::from_millis(99)).is_empty());
        assert_eq!(names(&w.expired(t + Duration::from_millis(100))), ["q/a"]);
        w.ride(5, |_, _| true);
        assert!(
            w.held_already(0, Path::new("q/b")).is_empty(),
            "rides a batch: waits for its ack"
        );
        assert_eq!(names(&w.expired(t + Duration::from_secs(1))), ["q/b"]);
    }
}
