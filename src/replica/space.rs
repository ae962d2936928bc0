//! Disk space on the replica (sans-IO: the caller passes the filesystem's
//! [`Room`] and the time).
//!
//! A file is staged only if the filesystem can hold all of its announced
//! size and an inode, with a margin: a peer that announces 10 GiB for a
//! 48 MB filesystem is told "no space" before a byte is written, not after
//! the disk is full. Once space ran out, the condition holds (alarm, status)
//! until the filesystem can hold what was refused again, rechecked at most
//! every [`RECHECK`]; a file that lands meanwhile does not end it (with
//! inodes exhausted, a rename still succeeds on a full disk).

use std::time::{Duration, Instant};

use super::fsops::Room;

/// Bytes kept free beyond a file's size: 1 % of the filesystem, at most
/// this much.
const MARGIN_BYTES_MAX: u64 = 4 << 20;
/// Inodes kept free beyond the one a file needs.
const MARGIN_INODES: u64 = 16;
/// How often a full filesystem is looked at again.
pub const RECHECK: Duration = Duration::from_millis(500);
/// A refused size nobody asked for again within this long (the sender
/// retries every 5 s at most) no longer holds the condition: the file was
/// deleted or replaced on the primary.
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// A file that does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoom {
    pub why: String,
    /// The first refusal of an episode (alarm now).
    pub became_full: bool,
}

/// What changed, for the caller to log and alarm once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    BecameFull(String),
    Cleared,
}

#[derive(Debug, Clone)]
struct Full {
    need_bytes: u64,
    last_refused: Instant,
    last_check: Instant,
}

/// The space condition of one filesystem.
#[derive(Debug, Clone, Default)]
pub struct Space {
    full: Option<Full>,
}

/// The bytes a file may take of `room`: what is free past the margin kept.
pub fn usable(room: &Room) -> u64 {
    room.bytes.saturating_sub(margin(room))
}

fn margin(room: &Room) -> u64 {
    (room.total_bytes / 100).min(MARGIN_BYTES_MAX)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl Space {
    pub fn is_full(&self) -> bool {
        self.full.is_some()
    }

    /// May a file of `size` bytes be staged? `Err` says why not; the
    /// condition holds from then on (`became_full` on its first refusal).
    pub fn admit(&mut self, now: Instant, room: Room, size: u64) -> Result<(), NoRoom> {
        let need = size.saturating_add(margin(&room));
        if room.bytes >= need && room.inodes > MARGIN_INODES {
            return Ok(());
        }
        let why = if room.inodes <= MARGIN_INODES {
            format!("{} inodes free", room.inodes)
        } else {
            format!(
                "{} announced, {} free (keeping {} in reserve)",
                mib(size),
                mib(room.bytes),
                mib(margin(&room))
            )
        };
        let became_full = self.refused(now, need, why.clone()).is_some();
        Err(NoRoom { why, became_full })
    }

    /// A write failed for lack of space (or a file was refused): the
    /// condition holds until `need_bytes` fit again.
    pub fn refused(&mut self, now: Instant, need_bytes: u64, why: String) -> Option<Change> {
        match &mut self.full {
            Some(f) => {
                f.need_bytes = f.need_bytes.max(need_bytes);
                f.last_refused = now;
                None
            }
            None => {
                self.full = Some(Full {
                    need_bytes,
                    last_refused: now,
                    last_check: now,
                });
                Some(Change::BecameFull(why))
            }
        }
    }

    /// While full, at most every [`RECHECK`]: whether `room` ends the
    /// condition. `None` when nothing is due.
    pub fn due(&self, now: Instant) -> bool {
        self.full
            .as_ref()
            .is_some_and(|f| now.saturating_duration_since(f.last_check) >= RECHECK)
    }

    pub fn recheck(&mut self, now: Instant, room: Room) -> Option<Change> {
        let f = self.full.as_mut()?;
        f.last_check = now;
        let m = margin(&room);
        let inodes_ok = room.inodes > 2 * MARGIN_INODES;
        let fits = room.bytes >= f.need_bytes.saturating_add(m);
        let forgotten =
            now.saturating_duration_since(f.last_refused) >= FORGET_AFTER && room.bytes >= 2 * m;
        if inodes_ok && (fits || forgotten) {
            self.full = None;
            return Some(Change::Cleared);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(bytes: u64, inodes: u64) -> Room {
        Room {
            bytes,
            inodes,
            total_bytes: 48 << 20,
        }
    }

    #[test]
    fn an_announced_size_that_cannot_fit_is_refused_before_staging() {
        let t = Instant::now();
        let mut s = Space::default();
        assert_eq!(s.admit(t, room(40 << 20, 1000), 1 << 20), Ok(()));
        let no = s.admit(t, room(40 << 20, 1000), 10 << 30).unwrap_err();
        assert!(no.why.contains("10240.0 MiB announced"), "{no:?}");
        assert!(no.became_full && s.is_full());
        let again = s.admit(t, room(40 << 20, 1000), 10 << 30).unwrap_err();
        assert!(!again.became_full, "one alarm per episode");
    }

    #[test]
    fn the_condition_holds_until_what_was_refused_fits_again() {
        let t = Instant::now();
        let mut s = Space::default();
        // Inodes exhausted: a small file is refused.
        assert!(s.admit(t, room(40 << 20, 3), 10).is_err());
        // Bytes are plentiful, inodes are not: still full, however often
        // it is looked at.
        for i in 1..10 {
            let now = t + RECHECK * i;
            assert!(s.due(now));
            assert_eq!(s.recheck(now, room(40 << 20, 3)), None);
        }
        assert_eq!(
            s.recheck(t + RECHECK * 10, room(40 << 20, 500)),
            Some(Change::Cleared)
        );
        assert!(!s.is_full());
    }

    #[test]
    fn a_refused_size_no_one_asks_for_again_is_forgotten() {
        let t = Instant::now();
        let mut s = Space::default();
        assert!(s.admit(t, room(40 << 20, 1000), 10 << 30).is_err());
        assert_eq!(s.recheck(t + RECHECK, room(40 << 20, 1000)), None);
        assert_eq!(
            s.recheck(t + FORGET_AFTER, room(40 << 20, 1000)),
            Some(Change::Cleared)
        );
    }
}
