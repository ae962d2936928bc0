//! A held name's sure delete waits behind another name of the same message.
//!
//! The replica holds a name found gone (an unsure delete) while it is the
//! only copy there of its message; the primary's second look sends the sure
//! delete. If, as that look is planned, another name of the same message
//! (same store, same Maildir base name; a sync's or a rename's) is in the
//! same batch, in flight or
//! waiting for a retry (refused for an I/O error or for room on the
//! replica), that name may not land before the sure delete does: a
//! failover between the two found the message only on the old primary
//! (simulator seeds 10529, 13859). The delete then stays unsure: the
//! replica holds the name again, and the next look comes at least
//! [`LOOK_BEHIND_MESSAGE_DELAY`] later (not a look per round trip while
//! the other name waits for its retry). When the other name lands, the
//! replica deletes the held one itself (the same message landed
//! elsewhere).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::tree::LocalTree;
use super::super::waiting::base_name;
use super::{OnAck, Sender};
use crate::tracker::Op;

/// How long a look that found another name of its message on its way
/// waits before the next (the retries of a refused file come every 250 ms
/// to 5 s).
pub(crate) const LOOK_BEHIND_MESSAGE_DELAY: Duration = Duration::from_millis(250);

/// Bound on the names remembered as waiting behind another (past it, the
/// set starts again: their next looks come sooner, nothing else changes).
const BEHIND_NAMES_MAX: usize = 65_536;

/// The names of one batch's syncs by message (store, Maildir base name).
pub(crate) type BatchNames = HashMap<(usize, OsString), Vec<PathBuf>>;

/// The syncs of a batch by message, gathered before it is planned.
pub(crate) fn batch_names(ops: &[Op]) -> BatchNames {
    let mut names = BatchNames::new();
    for op in ops {
        // A rename's new name too (sent as a rename, or as a sync of both
        // names when the replica lacks the source: seed 9959).
        let (store, rel) = match op {
            Op::Sync { store, rel, .. } => (store, rel),
            Op::Rename { store, to, .. } => (store, to),
            Op::Rescan { .. } => continue,
        };
        names
            .entry((*store, base_name(rel).to_os_string()))
            .or_default()
            .push(rel.clone());
    }
    names
}

impl<T: LocalTree> Sender<T> {
    /// Whether another name of the message `rel` stood for is in this
    /// batch, in flight or waiting for a retry (see the module's text).
    pub(super) fn same_message_on_its_way(
        &self,
        store: usize,
        rel: &Path,
        batch: &super::Inflight,
    ) -> bool {
        let base = base_name(rel);
        let other = |s: usize, p: &Path| s == store && p != rel && base_name(p) == base;
        // A name queued or retried is on its way only if it is a file here
        // (another held name's look, gone too, is not: two such looks would
        // each wait for the other).
        let a_file_here = |p: &Path| {
            self.stores[store]
                .tree
                .lstat(p)
                .ok()
                .flatten()
                .is_some_and(|st| st.kind == super::super::index::Kind::File)
        };
        if self
            .batch_names
            .get(&(store, base.to_os_string()))
            .is_some_and(|names| names.iter().any(|p| p != rel && a_file_here(p)))
        {
            return true;
        }
        let in_flight = self.acks_on_their_way(Some(batch)).any(|a| match a {
            OnAck::Set(_, s, p, e) => e.kind == super::super::index::Kind::File && other(*s, p),
            OnAck::Link(_, s, p, ..) | OnAck::Rename(_, s, _, p) => other(*s, p),
            _ => false,
        });
        in_flight
            || self.retry.iter().any(|(_, op)| match op {
                Op::Sync {
                    store: s, rel: p, ..
                } => other(*s, p) && a_file_here(p),
                _ => false,
            })
    }

    /// The sure delete of `rel` stayed unsure behind another name of its
    /// message: its next look waits [`LOOK_BEHIND_MESSAGE_DELAY`].
    pub(super) fn note_look_behind_message(&mut self, store: usize, rel: &Path) {
        if self.looks_behind.len() >= BEHIND_NAMES_MAX {
            self.looks_behind = HashSet::new();
        }
        self.looks_behind.insert((store, rel.to_path_buf()));
    }

    /// Whether the next look at `rel` waits (taken: once).
    pub(super) fn look_behind_message_taken(&mut self, store: usize, rel: &Path) -> bool {
        !self.looks_behind.is_empty() && self.looks_behind.remove(&(store, rel.to_path_buf()))
    }
}
