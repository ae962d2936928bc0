//! Anti-entropy that does not cry wolf: a periodic comparison with the
//! replica finds paths that differ. Most are changes still on their way
//! (queued, held for a periodic release, waiting for a retry, or made
//! while the comparison ran); those are sent as usual and not counted.
//! Only a difference no pending change explains is drift (the replica was
//! changed outside hasync, or a change was missed): it is repaired,
//! counted and alarmed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::tracker::Op;

/// A change made this close before the comparison started may not have
/// reached the tracker's queue yet (inotify → tracker thread → channel,
/// which lags under a burst of events): a difference at a path changed
/// here that recently (or below a folder that was) is counted as in
/// flight. Real drift there is still repaired, only not alarmed.
pub const CHANGE_SLACK: Duration = Duration::from_secs(2);

/// A path a comparison found different: store, path, and the newest
/// ctime here that may explain it (the entry's or a folder's above it).
pub type Difference = (usize, PathBuf, Option<(i64, u32)>);

/// What is on its way to the replica, per store: the paths of pending ops
/// and every folder above them.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Paths of pending ops (a rename contributes both names).
    paths: HashSet<(usize, PathBuf)>,
    /// Every ancestor folder of a pending path (its mtime changes with it).
    above: HashSet<(usize, PathBuf)>,
    /// Stores with a pending rescan: every difference in them is explained.
    rescanning: HashSet<usize>,
    /// Changes at or after this instant (seconds, nanoseconds since the
    /// epoch) are explained: the comparison raced them.
    since: (i64, u32),
}

impl InFlight {
    /// `started`: when the comparison asked for the replica's manifest.
    pub fn new(started: SystemTime) -> InFlight {
        let t = started
            .checked_sub(CHANGE_SLACK)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        InFlight {
            since: (t.as_secs() as i64, t.subsec_nanos()),
            ..InFlight::default()
        }
    }

    pub fn add_op(&mut self, op: &Op) {
        match op {
            Op::Sync { store, rel, .. } => self.add_path(*store, rel),
            Op::Rename {
                store, from, to, ..
            } => {
                self.add_path(*store, from);
                self.add_path(*store, to);
            }
            Op::Rescan { store, .. } => {
                self.rescanning.insert(*store);
            }
        }
    }

    pub fn add_path(&mut self, store: usize, rel: &Path) {
        let mut up = rel.parent();
        while let Some(p) = up {
            if !self.above.insert((store, p.to_path_buf())) {
                break;
            }
            up = p.parent();
        }
        self.paths.insert((store, rel.to_path_buf()));
    }

    /// Whether a difference at `rel` is a change on its way. `changed`: the
    /// local entry's ctime, or, for a path only the replica has, the ctime
    /// of its nearest folder that still exists here (a delete or a rename
    /// away changes it).
    pub fn explains(&self, store: usize, rel: &Path, changed: Option<(i64, u32)>) -> bool {
        if self.rescanning.contains(&store) {
            return true;
        }
        if changed.is_some_and(|c| c >= self.since) {
            return true;
        }
        let key = (store, rel.to_path_buf());
        if self.paths.contains(&key) || self.above.contains(&key) {
            return true;
        }
        // Below a pending path: a folder renamed or synced as a whole.
        rel.ancestors()
            .skip(1)
            .any(|a| self.paths.contains(&(store, a.to_path_buf())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sync(rel: &str) -> Op {
        Op::Sync {
            store: 0,
            rel: rel.into(),
            since: Instant::now(),
        }
    }

    #[test]
    fn pending_paths_their_folders_and_their_contents_are_explained() {
        let started = SystemTime::now();
        let mut f = InFlight::new(started);
        f.add_op(&sync("u1/cur/m1"));
        f.add_op(&Op::Rename {
            store: 0,
            from: ".Old".into(),
            to: ".New".into(),
            since: Instant::now(),
        });
        let long_ago = Some((1_000, 0));
        for p in [
            "u1/cur/m1",
            "u1/cur",
            "u1",
            ".Old/cur/x",
            ".New/new/y",
            ".New",
        ] {
            assert!(f.explains(0, Path::new(p), long_ago), "{p}");
        }
        for p in ["u2/cur/m1", "u1/new/m9", ".Older/cur/x"] {
            assert!(!f.explains(0, Path::new(p), long_ago), "{p}");
        }
        // Another store is another tree.
        assert!(!f.explains(1, Path::new("u1/cur/m1"), long_ago));
    }

    #[test]
    fn a_change_racing_the_comparison_is_explained_an_old_one_is_not() {
        let started = SystemTime::now();
        let f = InFlight::new(started);
        let now = started.duration_since(UNIX_EPOCH).unwrap();
        let recent = Some((now.as_secs() as i64 - 1, 0));
        let old = Some((now.as_secs() as i64 - 60, 0));
        assert!(f.explains(0, Path::new("a"), recent));
        assert!(!f.explains(0, Path::new("a"), old));
        assert!(!f.explains(0, Path::new("a"), None));
    }

    #[test]
    fn a_pending_rescan_explains_its_whole_store() {
        let mut f = InFlight::new(SystemTime::now());
        f.add_op(&Op::Rescan {
            store: 1,
            reason: "overflow".into(),
            since: Instant::now(),
        });
        assert!(f.explains(1, Path::new("any/thing"), None));
        assert!(!f.explains(0, Path::new("any/thing"), None));
    }
}
