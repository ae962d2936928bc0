//! Folders found gone under files being sent, and whether a comparison with
//! the replica must look for those files' new names.
//!
//! A file found missing whose folder is missing too may live on under a
//! name no event reports: its folder was renamed while the file was on its
//! way, and the file was made there before the folder's watch existed. Only
//! a comparison finds it for sure. Asking for one at each such folder made
//! a chain of whole-store comparisons out of one `rm -rf` of a mailbox
//! (each comparison's backlog found the next folder gone). So:
//!
//! - the folders are gathered until the tracker has read past the last of
//!   them and nothing is queued (the rest of the removal is seen first), or
//!   for [`VANISHED_WAIT_MAX`] at most;
//! - a folder the last comparison's walk already found gone is covered by
//!   it when the folder above it, which the walk stat'ed before it listed
//!   it, is unchanged since (same inode and ctime: no entry made, removed
//!   or renamed in it), and no rename that may be a folder's was planned
//!   since that comparison began or waits to be (a folder renamed across
//!   the walk's front is the one case the walk misses). Such a folder is
//!   covered at once, once the tracker has read past the walk's end, so
//!   the deletes of its held names go sure in one round;
//! - anything else asks for a comparison, as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::index::{Kind, Stat};
use super::super::tree::LocalTree;
use super::Sender;

/// How long vanished folders wait for the tracker and a quiet queue before
/// they are decided anyway (a store that never goes quiet).
pub(crate) const VANISHED_WAIT_MAX: Duration = Duration::from_secs(1);

/// Folders gathered in one wait before a comparison is asked for without
/// looking at each.
const VANISHED_FOLDERS_MAX: usize = 64;

/// Folders the last comparison found gone that it remembers (the topmost
/// of each gone subtree); beyond it, a folder found gone later asks for a
/// comparison.
const GONE_TOPS_MAX: usize = 4096;

/// A folder's inode and ctime, as a walk stat'ed it.
pub(crate) type DirStamp = (u64, i64, u32);

pub(crate) fn stamp(st: &Stat) -> DirStamp {
    (st.version.ino, st.version.ctime_s, st.version.ctime_ns)
}

/// Folders found gone, waiting to be decided.
pub(crate) struct Vanished {
    /// When the first was found: the tracker must have read past the last.
    last: Instant,
    first: Instant,
    folders: Vec<(usize, PathBuf)>,
    /// More than [`VANISHED_FOLDERS_MAX`]: a comparison, whatever they are.
    overflow: bool,
    asked: bool,
}

/// What the last finished comparison's walk found gone: the topmost folder
/// of each subtree the replica holds and this node does not, with the
/// stamp of the folder above it as the walk stat'ed that folder (before
/// listing it).
pub(crate) struct GoneAtWalk {
    tops: HashMap<(usize, PathBuf), DirStamp>,
    /// When the walk had ended: a rename made during it is read by then.
    ended: Instant,
}

impl GoneAtWalk {
    pub(crate) fn new() -> GoneAtWalk {
        GoneAtWalk {
            tops: HashMap::new(),
            ended: Instant::now(),
        }
    }

    /// The walk has ended (its comparison is finished).
    pub(crate) fn ended(mut self, at: Instant) -> GoneAtWalk {
        self.ended = at;
        self
    }

    /// Records a folder only the replica holds, in path order, with the
    /// stamp of its parent as the walk found it (`None`: not known).
    pub(crate) fn record(
        &mut self,
        last_top: &mut Option<PathBuf>,
        s: usize,
        rel: &Path,
        parent: Option<DirStamp>,
    ) {
        if last_top.as_ref().is_some_and(|t| rel.starts_with(t)) {
            return;
        }
        *last_top = Some(rel.to_path_buf());
        if let Some(parent) = parent.filter(|_| self.tops.len() < GONE_TOPS_MAX) {
            self.tops.insert((s, rel.to_path_buf()), parent);
        }
    }
}

impl<T: LocalTree> Sender<T> {
    /// A folder found gone under a file being sent (see the module's text).
    pub(crate) fn note_vanished_folder(&mut self, store: usize, folder: &Path, now: Instant) {
        if self.vanished.is_none() && self.covered_now(store, folder) {
            return;
        }
        let v = self.vanished.get_or_insert_with(|| Vanished {
            last: now,
            first: now,
            folders: Vec::new(),
            overflow: false,
            asked: false,
        });
        v.last = v.last.max(now);
        if v.overflow || v.folders.iter().any(|(s, f)| *s == store && f == folder) {
            return;
        }
        if v.folders.len() >= VANISHED_FOLDERS_MAX {
            v.overflow = true;
            v.folders = Vec::new();
            return;
        }
        v.folders.push((store, folder.to_path_buf()));
    }

    /// Decides the folders found gone once the tracker has read past them
    /// and nothing is queued (or they waited [`VANISHED_WAIT_MAX`]): a
    /// comparison is asked for unless the last one covers each.
    pub(super) fn decide_vanished(&mut self, now: Instant) {
        let Some(v) = &mut self.vanished else { return };
        // What the tracker read before the last is in the queue, not
        // only in its channel (the loop drains at every turn).
        let read = self.coalescer.drained_upto().is_some_and(|r| r > v.last);
        let quiet = read && self.coalescer.pending() == 0 && self.backlog.is_empty();
        let waited = now.saturating_duration_since(v.first) >= VANISHED_WAIT_MAX;
        if !quiet && !waited {
            if !read && !v.asked {
                v.asked = true;
                self.coalescer.ask_read_upto();
            }
            return;
        }
        let v = self.vanished.take().expect("checked above");
        let covered = quiet
            && !v.overflow
            && !self.rename_may_wait()
            && v.folders.iter().all(|(s, f)| self.gone_at_last_walk(*s, f));
        if covered {
            tracing::debug!(
                folders = v.folders.len(),
                "folders vanished under files being sent: the last comparison found them gone already"
            );
        } else {
            tracing::debug!(
                folders = v.folders.len(),
                overflow = v.overflow,
                "folders vanished under files being sent: comparing with the replica"
            );
            self.pending_verify = true;
        }
    }

    /// Whether the last comparison covers `folder` now: found gone by its
    /// walk, and every rename made before the walk ended planned (the
    /// tracker had read past the end when the queue was last drained, and
    /// none is queued or held).
    fn covered_now(&self, store: usize, folder: &Path) -> bool {
        let Some(ended) = self.gone_at_walk.as_ref().map(|g| g.ended) else {
            return false;
        };
        if self.folder_moved || self.coalescer.drained_upto().is_none_or(|r| r <= ended) {
            return false;
        }
        !self.rename_may_wait() && self.gone_at_last_walk(store, folder)
    }

    /// A rename is queued, waits for its retry, or is held by the periodic
    /// gate: not planned yet.
    fn rename_may_wait(&self) -> bool {
        let rename = |op: &crate::tracker::Op| matches!(op, crate::tracker::Op::Rename { .. });
        self.coalescer.rename_queued()
            || self.retry.iter().any(|(_, op)| rename(op))
            || self.gate.held().any(rename)
    }

    /// Whether the last comparison's walk found `folder` (or a folder
    /// above it) gone, and nothing since can have put it back or carried
    /// what it held out of the walk's sight.
    fn gone_at_last_walk(&self, store: usize, folder: &Path) -> bool {
        let Some(gone) = &self.gone_at_walk else {
            return false;
        };
        if self.folder_moved {
            return false;
        }
        let tree = &self.stores[store].tree;
        for top in folder.ancestors() {
            let Some(parent) = top.parent() else { break };
            let Some(seen) = gone.tops.get(&(store, top.to_path_buf())) else {
                continue;
            };
            return tree
                .lstat(parent)
                .ok()
                .flatten()
                .is_some_and(|st| st.kind == Kind::Dir && stamp(&st) == *seen);
        }
        false
    }

    /// A rename planned that may be a folder's: a walk that began before it
    /// may have missed what it carried.
    pub(super) fn note_rename_planned(&mut self, store: usize, to: &Path) {
        if self.folder_moved {
            return;
        }
        let file = self.stores[store]
            .tree
            .lstat(to)
            .ok()
            .flatten()
            .is_some_and(|st| st.kind != Kind::Dir);
        if !file {
            self.folder_moved = true;
        }
    }
}
