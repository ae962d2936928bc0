//! Landing staged messages in the live queue, durably and exactly once,
//! and completing what a crash or a failure interrupted: the one sequence
//! the ingester runs (for a push, and for a promoted queue replica), over a
//! [`QueueDisk`]: the queue's real filesystem in `push`, the queue
//! simulator's model of one with crash semantics in `queue::sim`.
//!
//! A batch: (1) its staged parts flushed; (2) one ledger append of every
//! message's intent, flushed: from here on the messages count as ingested;
//! (3) the renames into the queue; (4) the queue flushed; (5) a done record
//! (not flushed). A crash after (2) is completed at the next start by
//! [`roll_forward`]; before it, the staged files are garbage
//! ([`recover`] removes them) and the pusher still holds its copies.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;

use super::ledger::{Ledger, LedgerStore, Moves};
use crate::failpoint;

/// What the commit sequence does to the queue's filesystem.
pub trait QueueDisk {
    /// Flushes the queue's filesystem (data and names written so far). A
    /// failure counts in [`flush_failures`](Self::flush_failures).
    fn flush_all(&self) -> io::Result<()>;
    /// How many flushes of the queue's filesystem have failed so far. A
    /// writeback error is reported once, to whichever flush comes next:
    /// one that failed may have been another batch's, and the data it lost
    /// may be a batch staged meanwhile, whose own flush then succeeds.
    fn flush_failures(&self) -> u64;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Creates the missing folders of `dir`, as the MTA would have them.
    fn make_dirs(&self, dir: &Path) -> io::Result<()>;
    /// Flushes one folder (its entries).
    fn flush_dir(&self, dir: &Path) -> io::Result<()>;
    /// Removes every staged file (none of them counts).
    fn clear_staging(&self);
    /// Removes one staged file that does not count (nothing if it is gone).
    fn remove_staged(&self, path: &Path);
}

/// One message of a batch: its identity, the queue ID it lands under, and
/// where each staged part goes.
pub type Intent = (u128, String, Moves);

/// A step of the sequence failed.
#[derive(Debug)]
pub struct Failed {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// Lands `batch` (staged, not yet flushed) in the queue. `Ok`: every
/// message is durable in the queue. An error before the intents are
/// recorded leaves nothing counted; after, the ledger counts them (see
/// `Ledger::pending`) and [`roll_forward`] completes them.
/// `staged_since`: [`QueueDisk::flush_failures`] before the batch's first
/// message was staged; a flush that failed since may have lost its data,
/// so the batch then counts as failed too.
pub fn commit<S: LedgerStore>(
    disk: &impl QueueDisk,
    queue_dir: &Path,
    ledger: &Mutex<Ledger<S>>,
    batch: &[Intent],
    staged_since: u64,
) -> Result<(), Failed> {
    if batch.is_empty() {
        return Ok(());
    }
    let failed = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| Failed { op, path, source }
    };
    let t0 = std::time::Instant::now();
    disk.flush_all().map_err(failed("syncfs", queue_dir))?;
    let staged_flushed = t0.elapsed();
    if disk.flush_failures() != staged_since {
        return Err(Failed {
            op: "syncfs",
            path: queue_dir.to_owned(),
            source: io::Error::other(
                "a flush of the queue's filesystem failed after this batch was staged (its data may be lost)",
            ),
        });
    }
    failpoint::hit("queue.after_stage");
    {
        let mut ledger = ledger.lock().expect("ledger lock");
        ledger
            .record_intents(batch)
            .map_err(failed("append to", ledger.path()))?;
    }
    failpoint::hit("queue.after_intent");
    let intents_flushed = t0.elapsed();
    for (_, _, moves) in batch {
        failpoint::hit("queue.mid_rename");
        if failpoint::fails("queue.fail_mid_rename") {
            return Err(Failed {
                op: "rename",
                path: queue_dir.to_owned(),
                source: io::Error::other("failpoint queue.fail_mid_rename"),
            });
        }
        for (staged, fin) in moves {
            disk.rename(staged, fin).map_err(failed("rename", fin))?;
        }
    }
    let renamed = t0.elapsed();
    disk.flush_all().map_err(failed("syncfs", queue_dir))?;
    failpoint::hit("queue.after_rename");
    // Where a batch's time goes (the flushes are the floor).
    tracing::debug!(
        n = batch.len(),
        staged_flush_us = staged_flushed.as_micros() as u64,
        intents_us = (intents_flushed - staged_flushed).as_micros() as u64,
        renames_us = (renamed - intents_flushed).as_micros() as u64,
        queue_flush_us = (t0.elapsed() - renamed).as_micros() as u64,
        "ingest batch landed"
    );
    let keys: Vec<u128> = batch.iter().map(|(k, _, _)| *k).collect();
    let mut ledger = ledger.lock().expect("ledger lock");
    if let Err(e) = ledger.record_done(&keys) {
        // The batch is durable in the queue; the next start rolls it again.
        warn!(path = %ledger.path().display(), "cannot record an ingest batch as done: {e}");
    }
    Ok(())
}

/// Completes every ingest whose intent is in the ledger without its done
/// record (of `only`'s identities, if given): a crash, or a commit that
/// failed after its intents were recorded. Returns the identities and queue
/// IDs it completed.
pub fn roll_forward<S: LedgerStore>(
    disk: &impl QueueDisk,
    ledger: &mut Ledger<S>,
    only: Option<&HashSet<u128>>,
) -> Result<Vec<(u128, String)>, Failed> {
    // Only what is durably counted may land.
    if !ledger.pending().is_empty() {
        ledger.make_durable().map_err(|source| Failed {
            op: "rewrite",
            path: ledger.path().to_owned(),
            source,
        })?;
    }
    let mut done = Vec::new();
    for (key, queue_id, moves) in ledger.pending() {
        if only.is_some_and(|o| !o.contains(&key)) {
            continue;
        }
        for (staged, fin) in &moves {
            if failpoint::fails("queue.fail_roll_forward") {
                return Err(Failed {
                    op: "roll forward",
                    path: staged.clone(),
                    source: io::Error::other("failpoint queue.fail_roll_forward"),
                });
            }
            if disk.exists(staged) {
                if let Some(d) = fin.parent() {
                    let _ = disk.make_dirs(d);
                }
                disk.rename(staged, fin).map_err(|source| Failed {
                    op: "roll forward",
                    path: staged.clone(),
                    source,
                })?;
            }
            // Durable before it counts as done (also when an earlier
            // attempt renamed it already).
            if let Some(d) = fin.parent() {
                match disk.flush_dir(d) {
                    Ok(()) => {}
                    // Gone since (the MTA removed it): nothing to flush.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Failed {
                            op: "flush",
                            path: d.to_owned(),
                            source,
                        })
                    }
                }
            }
        }
        done.push((key, queue_id));
    }
    if !done.is_empty() {
        let keys: Vec<u128> = done.iter().map(|(k, _)| *k).collect();
        if let Err(e) = ledger.record_done(&keys) {
            // The moves are durable; the next start rolls them again.
            warn!(path = %ledger.path().display(), "cannot record rolled-forward ingests as done: {e}");
        }
    }
    Ok(done)
}

/// At start: completes what the ledger counts, then removes the staged
/// files that never counted (their pusher kept its copies).
pub fn recover<S: LedgerStore>(
    disk: &impl QueueDisk,
    ledger: &mut Ledger<S>,
) -> Result<Vec<(u128, String)>, Failed> {
    let done = roll_forward(disk, ledger, None)?;
    disk.clear_staging();
    Ok(done)
}

/// What a failed commit of a batch leaves.
#[derive(Debug)]
pub enum Settled {
    /// Its intents were recorded, and it is completed now: the messages
    /// are durable in the queue.
    Landed(Vec<(u128, String)>),
    /// Nothing of it counts: its pusher keeps the copies (its staged files
    /// are removed).
    NotCounted,
    /// Its intents are recorded but it cannot be completed now: it is
    /// completed before the next push is judged, or at the next start.
    Stuck(Failed),
}

/// After a commit of `batch` failed: complete it if the ledger counts its
/// messages already (a later push of them is a duplicate, so dropping them
/// would lose them), else nothing counts and its staged files go.
pub fn settle_failed<S: LedgerStore>(
    disk: &impl QueueDisk,
    ledger: &mut Ledger<S>,
    batch: &[Intent],
) -> Settled {
    let keys: HashSet<u128> = batch.iter().map(|(k, _, _)| *k).collect();
    let recorded = ledger.pending().iter().any(|(k, _, _)| keys.contains(k));
    if !recorded {
        for (_, _, moves) in batch {
            for (staged, _) in moves {
                disk.remove_staged(staged);
            }
        }
        return Settled::NotCounted;
    }
    match roll_forward(disk, ledger, Some(&keys)) {
        Ok(done) => Settled::Landed(done),
        Err(f) => Settled::Stuck(f),
    }
}
