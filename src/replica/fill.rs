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
//! No file: the node never was a replica (a fresh node, which may start a
//! pair) or it was one under a release without the mark; either way it
//! starts a fill at its next sync session and is complete at its
//! `CaughtUp`.
//!
//! The mark is one per node, not per store: a store added to a running
//! pair is filled on a node that already counts as complete.

use std::io;
use std::path::{Path, PathBuf};

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

/// Is the replica incomplete by its mark? A mark that cannot be read
/// counts as incomplete (the node then waits for its peer, or for the
/// operator, rather than serve without mail), and is logged.
pub fn incomplete(state_dir: &Path) -> bool {
    match load(state_dir) {
        Ok(mark) => mark == Some(Fill::Filling),
        Err(e) => {
            tracing::error!(
                alarm = true,
                "ALARM: {e}; the replica counts as incomplete until its next complete sync (or `hasync accept-replica`)"
            );
            true
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
/// node served as primary (its store is its own: complete). Returns
/// whether the replica is incomplete now.
pub fn session_starts(state_dir: &Path, served: bool) -> io::Result<bool> {
    let mark = load(state_dir).unwrap_or(Some(Fill::Filling));
    match (mark, served) {
        (Some(Fill::Complete), _) => Ok(false),
        (_, true) => store(state_dir, Fill::Complete).map(|()| false),
        (Some(Fill::Filling), false) => Ok(true),
        (None, false) => store(state_dir, Fill::Filling).map(|()| true),
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
        assert!(!incomplete(d), "a fresh node may start a pair");
        assert!(session_starts(d, false).unwrap());
        assert_eq!(load(d).unwrap(), Some(Fill::Filling));
        assert!(incomplete(d));
        // A session cut and begun again: still filling.
        assert!(session_starts(d, false).unwrap());
        complete(d).unwrap();
        assert!(!incomplete(d));
        assert!(
            !session_starts(d, false).unwrap(),
            "complete stays complete"
        );

        let other = tempfile::tempdir().unwrap();
        assert!(!session_starts(other.path(), true).unwrap());
        assert_eq!(load(other.path()).unwrap(), Some(Fill::Complete));
    }

    #[test]
    fn a_garbled_mark_is_named_and_counts_as_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"half\n").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("replica-fill") && e.contains("half"), "{e}");
        assert!(incomplete(dir.path()));
        assert!(session_starts(dir.path(), false).unwrap());
        complete(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(Fill::Complete));
    }
}
