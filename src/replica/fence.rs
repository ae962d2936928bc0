//! The epoch as a fencing token on the data path.
//!
//! Every sync session starts with the epoch of the primary tenure that
//! sends it, and every queue push names the tenure it is addressed to. A
//! node admits a session only from an epoch at least as high as the
//! highest it knows of: its own durable epoch (the failover core's record,
//! given by the daemon) or one a session brought (kept here, durably,
//! before the session goes on). A primary deposed in a split brain that
//! has not heard of it yet is thus refused by every replica that has, and
//! a session in progress is cut as soon as the replica learns of a higher
//! epoch.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;

/// The file in the state directory holding the highest epoch a session
/// brought.
pub const FENCE_FILE: &str = "fence";
const HEADER: &str = "hasync-fence 1";

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("{path}: {problem}")]
    Damaged { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The highest epoch this node knows of; shared by the daemon (which
/// raises it with each durable epoch record) and the engine's sessions.
pub struct Fence {
    path: PathBuf,
    seen: watch::Sender<u64>,
    /// Highest epoch written to [`FENCE_FILE`] (writes one at a time).
    written: Mutex<u64>,
}

impl Fence {
    /// Loads the fence of `state_dir` (none yet: epoch 0).
    pub fn load(state_dir: &Path) -> Result<Fence, FenceError> {
        let path = state_dir.join(FENCE_FILE);
        let written = match std::fs::read(&path) {
            Ok(bytes) => parse(&bytes).map_err(|problem| FenceError::Damaged {
                path: path.clone(),
                problem,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(FenceError::Io { path, source }),
        };
        Ok(Fence {
            path,
            seen: watch::channel(written).0,
            written: Mutex::new(written),
        })
    }

    /// The highest epoch known.
    pub fn seen(&self) -> u64 {
        *self.seen.borrow()
    }

    /// Wakes when the epoch known rises.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.seen.subscribe()
    }

    /// The node's own epoch record is durable at `epoch` (it is kept in the
    /// record, not here).
    pub fn observe_durable(&self, epoch: u64) {
        self.seen.send_if_modified(|s| {
            let higher = epoch > *s;
            *s = (*s).max(epoch);
            higher
        });
    }

    /// A session from `epoch` asks to be admitted: `Err(seen)` if a higher
    /// epoch is known. A higher epoch than any known is made durable first.
    pub fn admit(&self, epoch: u64) -> Result<(), Admission> {
        let seen = self.seen();
        if epoch < seen {
            return Err(Admission::Stale { seen });
        }
        let mut written = self.written.lock().expect("fence lock");
        // Not known yet (the node's record holds what it knows).
        if epoch > seen && epoch > *written {
            let body = format!("{HEADER}\n{epoch}\n");
            crate::io::write_atomic_blocking(&self.path, body.as_bytes()).map_err(|source| {
                Admission::Unrecorded {
                    path: self.path.clone(),
                    source,
                }
            })?;
            *written = epoch;
        }
        drop(written);
        self.observe_durable(epoch);
        Ok(())
    }
}

/// Why a session was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Admission {
    #[error("its epoch is below {seen}, the highest this node knows: a newer primary exists")]
    Stale { seen: u64 },
    #[error("cannot record its epoch durably in {path}: {source}")]
    Unrecorded { path: PathBuf, source: io::Error },
}

/// Parses the fence file (tools and the fuzzer use it too).
pub fn parse(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("line 1 is not {HEADER:?}"));
    }
    let epoch = lines
        .next()
        .ok_or_else(|| "line 2 (the epoch) is missing".to_string())?;
    let epoch = epoch
        .parse::<u64>()
        .map_err(|e| format!("line 2: {epoch:?} is not an epoch: {e}"))?;
    if lines.next().is_some() {
        return Err("text after line 2".into());
    }
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_epoch_is_refused_and_a_higher_one_is_durable_before_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::load(dir.path()).unwrap();
        assert_eq!(f.seen(), 0);
        f.observe_durable(4);
        assert!(matches!(f.admit(3), Err(Admission::Stale { seen: 4 })));
        f.admit(4).unwrap();
        // Known from the record: nothing written.
        assert!(!dir.path().join(FENCE_FILE).exists());
        f.admit(6).unwrap();
        assert_eq!(f.seen(), 6);
        let again = Fence::load(dir.path()).unwrap();
        assert_eq!(again.seen(), 6, "survives a restart");
        assert!(matches!(again.admit(5), Err(Admission::Stale { seen: 6 })));
    }

    #[test]
    fn a_subscriber_hears_a_higher_epoch_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::load(dir.path()).unwrap();
        f.observe_durable(3);
        let mut rx = f.subscribe();
        rx.borrow_and_update();
        f.observe_durable(2);
        assert!(!rx.has_changed().unwrap());
        f.observe_durable(5);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 5);
    }

    #[test]
    fn a_damaged_fence_is_refused_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FENCE_FILE), "hasync-fence 1\nseven\n").unwrap();
        let e = Fence::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("fence") && e.contains("line 2"), "{e}");
        assert!(parse(b"hasync-fence 1\n7\n") == Ok(7));
        assert!(parse(b"other\n7\n").is_err());
        assert!(parse(b"hasync-fence 1\n7\n8\n").is_err());
        assert!(parse(b"hasync-fence 1\n").is_err());
    }
}
