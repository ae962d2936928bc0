//! IMAP UIDs after a failover, for Dovecot Maildir stores
//! (`kind = "dovecot-maildir"`).
//!
//! Dovecot hands out a mailbox's next UID from its `dovecot-uidlist`: the
//! larger of the `N` field of the header and the highest UID listed, plus
//! one. A message the old primary delivered in its replication lag window
//! got a UID the new primary never saw; without a remedy the new primary
//! gives that same UID to its next message, with UIDVALIDITY unchanged, and
//! a client that cached the old message shows the wrong content. At
//! promotion, before anything starts Dovecot here, each mailbox's next UID
//! is raised by a margin larger than the deliveries the lag window can
//! hold, so a UID the old primary may have handed out is never reused. The
//! UIDs of the messages the new primary holds, and UIDVALIDITY, do not
//! change: clients keep their caches.
//!
//! The file is rewritten the way Dovecot rewrites it: written to its lock
//! file (`dovecot-uidlist.lock`, created exclusively), flushed, renamed
//! over the original, the folder flushed.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::warn;

pub const UIDLIST: &str = "dovecot-uidlist";
const LOCK: &str = "dovecot-uidlist.lock";
/// A uidlist larger than this is not Dovecot's (a mailbox of a million
/// messages has a uidlist of about 60 MB).
const UIDLIST_BYTES_MAX: u64 = 256 << 20;
/// How long a lock left by someone else is waited for before it is taken
/// as stale (Dovecot does not run here yet; a lock is the old primary's,
/// replicated mid-write).
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Folders deeper than this are not searched for mailboxes.
const DEPTH_MAX: usize = 64;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Mailboxes whose next UID was raised.
    pub raised: usize,
    /// Mailboxes that could not be raised, with why (alarmed).
    pub failed: Vec<String>,
}

/// What a uidlist says about the next UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidList {
    pub version: u32,
    pub uid_validity: u32,
    /// The header's `N`.
    pub next_uid: u32,
    /// The highest UID listed.
    pub max_uid: u32,
}

impl UidList {
    /// The UID Dovecot would hand out next.
    pub fn effective_next(&self) -> u32 {
        self.next_uid.max(self.max_uid.saturating_add(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UidListError {
    #[error("empty file")]
    Empty,
    #[error("unsupported header {0:?} (versions 1 and 3 are Dovecot's)")]
    Header(String),
    #[error("line {line}: {what}")]
    Record { line: usize, what: String },
    #[error("the next UID would pass 2^32-1 (the mailbox needs a new UIDVALIDITY)")]
    Overflow,
}

/// Parses a uidlist (header and records).
pub fn parse(text: &str) -> Result<UidList, UidListError> {
    let mut lines = text.lines();
    let header = lines.next().ok_or(UidListError::Empty)?;
    let mut f = header.split(' ');
    let bad = || UidListError::Header(header.chars().take(80).collect());
    let version: u32 = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let (uid_validity, next_uid) = match version {
        // "1 <uidvalidity> <nextuid>"
        1 => {
            let v = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
            let n = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
            (v, n)
        }
        // "3 V<uidvalidity> N<nextuid> G<guid> …"
        3 => {
            let (mut v, mut n) = (None, None);
            for tok in f {
                if let Some(x) = tok.strip_prefix('V') {
                    v = x.parse().ok();
                } else if let Some(x) = tok.strip_prefix('N') {
                    n = x.parse().ok();
                }
            }
            (v.ok_or_else(bad)?, n.ok_or_else(bad)?)
        }
        _ => return Err(bad()),
    };
    let mut max_uid = 0u32;
    for (i, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let uid = line
            .split(' ')
            .next()
            .and_then(|u| u.parse::<u32>().ok())
            .ok_or_else(|| UidListError::Record {
                line: i + 2,
                what: "does not start with a UID".into(),
            })?;
        max_uid = max_uid.max(uid);
    }
    Ok(UidList {
        version,
        uid_validity,
        next_uid,
        max_uid,
    })
}

/// `text` with its header's next UID set to `next`; the records unchanged.
pub fn with_next_uid(text: &str, list: &UidList, next: u32) -> String {
    let (header, rest) = match text.find('\n') {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, ""),
    };
    let header = match list.version {
        1 => format!("1 {} {next}", list.uid_validity),
        _ => header
            .split(' ')
            .map(|t| {
                if t.starts_with('N') && t[1..].parse::<u32>().is_ok() {
                    format!("N{next}")
                } else {
                    t.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    };
    format!("{header}{rest}")
}

/// Raises the next UID of every mailbox under `root` by `margin`.
pub fn raise_next_uids(root: &Path, margin: u32) -> Report {
    let mut report = Report::default();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                report
                    .failed
                    .push(format!("{}: cannot list: {e}", dir.display()));
                continue;
            }
        };
        for ent in rd.flatten() {
            let Ok(ft) = ent.file_type() else { continue };
            if ft.is_dir() {
                // Maildir's own folders hold messages, not mailboxes.
                let name = ent.file_name();
                if depth < DEPTH_MAX && !matches!(name.to_str(), Some("cur" | "new" | "tmp")) {
                    stack.push((ent.path(), depth + 1));
                }
            } else if ft.is_file() && ent.file_name() == UIDLIST {
                match raise_one(&dir, margin) {
                    Ok(()) => report.raised += 1,
                    Err(e) => report.failed.push(format!("{}: {e}", ent.path().display())),
                }
            }
        }
    }
    report
}

/// Raises one mailbox's next UID (its folder holds `dovecot-uidlist`).
pub fn raise_one(mailbox: &Path, margin: u32) -> io::Result<()> {
    let path = mailbox.join(UIDLIST);
    let meta = fs::metadata(&path)?;
    if meta.len() > UIDLIST_BYTES_MAX {
        return Err(io::Error::other(format!(
            "{} bytes: larger than any uidlist ({UIDLIST_BYTES_MAX} at most)",
            meta.len()
        )));
    }
    let lock = take_lock(mailbox)?;
    let result = (|| {
        // Read under the lock: what Dovecot wrote last.
        let text = fs::read_to_string(&path)?;
        let list = parse(&text).map_err(io::Error::other)?;
        let next = list
            .effective_next()
            .checked_add(margin)
            .filter(|n| *n < u32::MAX)
            .ok_or_else(|| io::Error::other(UidListError::Overflow))?;
        let out = with_next_uid(&text, &list, next);
        let mut f = fs::OpenOptions::new().write(true).open(&lock)?;
        f.write_all(out.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        f.sync_all()?;
        fs::rename(&lock, &path)?;
        fs::File::open(mailbox)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&lock);
    }
    result
}

/// Creates `dovecot-uidlist.lock` exclusively; a lock someone else holds
/// longer than [`LOCK_WAIT`] is taken as stale and replaced.
fn take_lock(mailbox: &Path) -> io::Result<PathBuf> {
    let lock = mailbox.join(LOCK);
    let until = Instant::now() + LOCK_WAIT;
    loop {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock)
        {
            Ok(_) => return Ok(lock),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if Instant::now() >= until {
                    warn!(lock = %lock.display(), "a uidlist lock nobody released (the old primary's, replicated mid-write): taken as stale");
                    fs::remove_file(&lock)?;
                    continue;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Dovecot's own files in a mailbox (uidlist, indexes, keywords): after a
/// failover the new primary's are right for the mail it holds; an old
/// primary's are never a conflict worth keeping.
pub fn is_dovecot_metadata(rel: &Path) -> bool {
    rel.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("dovecot-") || n.starts_with("dovecot."))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = "3 V1796173079 N1 G18b52a09176d0f6b571c000083ecc375\n\
                      1 :1796173079.M1P1.vm,S=20,W=23\n\
                      2 :1796173079.M2P2.vm,S=20,W=23\n\
                      7 W23 :1796173079.M7P7.vm,S=20,W=23\n";

    #[test]
    fn parses_dovecot_v3_and_v1() {
        let l = parse(V3).unwrap();
        assert_eq!(
            l,
            UidList {
                version: 3,
                uid_validity: 1796173079,
                next_uid: 1,
                max_uid: 7
            }
        );
        assert_eq!(l.effective_next(), 8);
        let l1 = parse("1 1234 40\n3 :a\n").unwrap();
        assert_eq!((l1.uid_validity, l1.next_uid, l1.max_uid), (1234, 40, 3));
        assert_eq!(l1.effective_next(), 40);
    }

    #[test]
    fn bad_uidlists_are_errors_not_panics() {
        for bad in ["", "9 V1 N1\n", "3 N5\n", "3 V1 N1\nx :a\n", "1 2\n"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_the_next_uid_changes() {
        let l = parse(V3).unwrap();
        let out = with_next_uid(V3, &l, 1008);
        assert!(out.starts_with("3 V1796173079 N1008 G18b52a09176d0f6b571c000083ecc375\n"));
        assert_eq!(
            out.lines().skip(1).collect::<Vec<_>>(),
            V3.lines().skip(1).collect::<Vec<_>>()
        );
        assert_eq!(
            with_next_uid(
                "1 1234 40\n3 :a\n",
                &parse("1 1234 40\n3 :a\n").unwrap(),
                90
            ),
            "1 1234 90\n3 :a\n"
        );
    }

    #[test]
    fn raises_every_mailbox_keeping_owner_mode_and_records() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("u1/Maildir");
        let sub = inbox.join(".Sent");
        for m in [&inbox, &sub] {
            fs::create_dir_all(m.join("cur")).unwrap();
            fs::write(m.join(UIDLIST), V3).unwrap();
            fs::set_permissions(m.join(UIDLIST), fs::Permissions::from_mode(0o640)).unwrap();
        }
        // A message folder is not searched; a stale lock is taken over.
        fs::write(inbox.join("cur").join(UIDLIST), "not a uidlist").unwrap();
        fs::write(sub.join(LOCK), "").unwrap();
        let r = raise_next_uids(d.path(), 1000);
        assert_eq!(
            r,
            Report {
                raised: 2,
                failed: vec![]
            }
        );
        for m in [&inbox, &sub] {
            let text = fs::read_to_string(m.join(UIDLIST)).unwrap();
            let l = parse(&text).unwrap();
            assert_eq!(
                (l.next_uid, l.max_uid, l.uid_validity),
                (1008, 7, 1796173079)
            );
            assert_eq!(fs::metadata(m.join(UIDLIST)).unwrap().mode() & 0o777, 0o640);
            assert!(!m.join(LOCK).exists());
        }
    }

    #[test]
    fn a_broken_uidlist_is_reported_and_left_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(UIDLIST), "3 garbage\n").unwrap();
        let r = raise_next_uids(d.path(), 10);
        assert_eq!(r.raised, 0);
        assert_eq!(r.failed.len(), 1, "{r:?}");
        assert_eq!(
            fs::read_to_string(d.path().join(UIDLIST)).unwrap(),
            "3 garbage\n"
        );
        assert!(!d.path().join(LOCK).exists());
        // Near the end of the UID space: an error, never a wrap.
        fs::write(d.path().join(UIDLIST), format!("3 V1 N{}\n", u32::MAX - 5)).unwrap();
        assert!(raise_one(d.path(), 10).is_err());
    }

    #[test]
    fn dovecot_metadata_names() {
        for n in [
            "a/dovecot-uidlist",
            "dovecot.index.log",
            "x/dovecot-keywords",
            "dovecot.list.index",
        ] {
            assert!(is_dovecot_metadata(Path::new(n)), "{n}");
        }
        for n in ["a/cur/1.M1:2,S", "dovecotx", "subscriptions"] {
            assert!(!is_dovecot_metadata(Path::new(n)), "{n}");
        }
    }
}
