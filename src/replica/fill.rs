//! Whether this node's replica holds all the mail: the durable fill mark.
//!
//! A secondary's first sync fills its replica from the primary; until that
//! fill has finished, the replica holds only part of the mail. A node whose
//! replica is incomplete must not take over on its own: its users would
//! find their mailboxes emptied while the peer, which holds the rest, is
//! down, and whatever they did meanwhile would make the peer's mail
//! conflicts once it returns. (DRBD refuses to promote an `Inconsistent`
//! disk for the same reason.)
//!
//! File `<state_dir>/replica-fill`, one word:
//! - `filling`: written (durably) when a sync session begins on a replica
//!   that was never complete, before anything of that session is applied;
//! - `complete`: written when the primary says the replica has caught up
//!   (everything sent durable here), when the node serves as primary (its
//!   store is the one its users see), or when the operator accepts the
//!   replica as it is (`hasync accept-replica`).
//!
//! No file: the node never was a replica. If it served as primary (its
//! former-primary mark) or holds a replica index of every store (a replica
//! of a release without the mark), it counts as complete; otherwise it is
//! fresh (a new or replaced node): it may start a pair with the mail it was
//! given, but it does not take over from a peer whose replica is
//! incomplete, and its first sync session marks it filling.
//!
//! The mark is one per node, not per store: a store added to a running
//! pair is filled on a node that already counts as complete.

use std::io;
use std::path::{Path, PathBuf};

use crate::failover::ReplicaFill;

/// The mark's file name in the state directory.
pub const FILL_FILE: &str = "replica-fill";

/// What the mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A first fill is under way: the replica is incomplete.
    Filling,
    /// The replica was complete once (or the node served).
    Complete,
}

impl Fill {
    fn word(self) -> &'static str {
        match self {
            Fill::Filling => "filling",
            Fill::Complete => "complete",
        }
    }
}

/// A mark that cannot be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("cannot read the replica fill mark {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the replica fill mark {path} says {found:?}, expected \"filling\" or \"complete\"")]
    Garbled { path: PathBuf, found: String },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILL_FILE)
}

/// The mark, `None` without one.
pub fn load(state_dir: &Path) -> Result<Option<Fill>, FillError> {
    let path = path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FillError::Read { path, source }),
    };
    let word = String::from_utf8_lossy(&text);
    match word.trim() {
        "filling" => Ok(Some(Fill::Filling)),
        "complete" => Ok(Some(Fill::Complete)),
        other => Err(FillError::Garbled {
            path,
            found: other.chars().take(64).collect(),
        }),
    }
}

/// What this node's stores hold, by its marks, as it starts: `served`,
/// it has a former-primary mark; `had_replica`, every store has a replica
/// index. A mark that cannot be read counts as incomplete (the node then
/// waits for its peer, or for the operator, rather than serve without
/// mail), and is logged.
pub fn holds(state_dir: &Path, served: bool, had_replica: bool) -> ReplicaFill {
    match load(state_dir) {
        Ok(Some(Fill::Filling)) => ReplicaFill::Filling,
        Ok(Some(Fill::Complete)) => ReplicaFill::Complete,
        Ok(None) if served || had_replica => ReplicaFill::Complete,
        Ok(None) => ReplicaFill::Fresh,
        Err(e) => {
            tracing::error!(
                alarm = true,
                "ALARM: {e}; the replica counts as incomplete until its next complete sync (or `hasync accept-replica`)"
            );
            ReplicaFill::Filling
        }
    }
}

/// Writes the mark durably (temporary file, fsync, rename, directory
/// fsync).
pub fn store(state_dir: &Path, fill: Fill) -> io::Result<()> {
    crate::io::write_atomic_blocking(&path(state_dir), format!("{}\n", fill.word()).as_bytes())
}

/// A sync session begins on this node as a replica: a replica never
/// complete is marked as filling before anything is applied. `served`: the
/// node served as primary (its store is its own: complete); `had_replica`:
/// every store has a replica index already (a replica of a release
/// without the mark: complete). Returns whether the replica is incomplete
/// now.
pub fn session_starts(state_dir: &Path, served: bool, had_replica: bool) -> io::Result<bool> {
    let mark = load(state_dir).unwrap_or(Some(Fill::Filling));
    match mark {
        Some(Fill::Complete) => Ok(false),
        _ if served => store(state_dir, Fill::Complete).map(|()| false),
        Some(Fill::Filling) => Ok(true),
        None if had_replica => store(state_dir, Fill::Complete).map(|()| false),
        None => store(state_dir, Fill::Filling).map(|()| true),
    }
}

/// The replica is complete now (caught up, serving, or accepted): marked
/// so unless it already is.
pub fn complete(state_dir: &Path) -> io::Result<()> {
    if matches!(load(state_dir), Ok(Some(Fill::Complete))) {
        return Ok(());
    }
    store(state_dir, Fill::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_session_marks_filling_until_complete_and_a_former_primary_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(load(d).unwrap(), None);
        assert_eq!(holds(d, false, false), ReplicaFill::Fresh);
        assert!(session_starts(d, false, false).unwrap());
        assert_eq!(load(d).unwrap(), Some(Fill::Filling));
        assert_eq!(holds(d, false, false), ReplicaFill::Filling);
        // A session cut and begun again: still filling, whatever the
        // index says by then.
        assert!(session_starts(d, false, true).unwrap());
        complete(d).unwrap();
        assert_eq!(holds(d, false, false), ReplicaFill::Complete);
        assert!(
            !session_starts(d, false, false).unwrap(),
            "complete stays complete"
        );

        let served = tempfile::tempdir().unwrap();
        assert_eq!(holds(served.path(), true, false), ReplicaFill::Complete);
        assert!(!session_starts(served.path(), true, false).unwrap());
        assert_eq!(load(served.path()).unwrap(), Some(Fill::Complete));

        // A replica of a release without the mark (its index exists).
        let earlier = tempfile::tempdir().unwrap();
        assert_eq!(holds(earlier.path(), false, true), ReplicaFill::Complete);
        assert!(!session_starts(earlier.path(), false, true).unwrap());
        assert_eq!(load(earlier.path()).unwrap(), Some(Fill::Complete));
    }

    #[test]
    fn a_garbled_mark_is_named_and_counts_as_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"half\n").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("replica-fill") && e.contains("half"), "{e}");
        assert_eq!(holds(dir.path(), true, true), ReplicaFill::Filling);
        assert!(session_starts(dir.path(), false, true).unwrap());
        complete(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(Fill::Complete));
    }
}
