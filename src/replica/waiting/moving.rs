//! Names an unsure delete holds on the replica: the primary found them
//! gone and does not know whether the message was expunged or moved to a
//! name it has not sent yet. The replica keeps its only copy until the
//! same message lands under another name (then the old name goes at once)
//! or the primary deletes it again, sure.
//!
//! "The same message" is the same content under the same Maildir base name
//! (the file name up to its `:` info part, which a flag change or a move
//! to another folder keeps): a copy of the bytes under another name (a
//! user's copy to another folder) does not release it. Sans-IO.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Bound on what the held names take (each a path twice and about 100
/// bytes of maps): past it, an unsure delete applies at once.
pub const MAY_HAVE_MOVED_BYTES_MAX: usize = 8 << 20;

/// How many landings are remembered (content and base name), so that an
/// unsure delete of a name whose message has just landed under another
/// (a hard link then an unlink, its new name landed first) is not held.
pub const RECENT_LANDINGS_MAX: usize = 4_096;

/// The message a file name stands for: its Maildir base name (up to the
/// first `:`), or the whole name.
pub fn base_name(rel: &Path) -> &OsStr {
    let name = rel.file_name().unwrap_or(rel.as_os_str()).as_bytes();
    let end = name.iter().position(|&b| b == b':').unwrap_or(name.len());
    OsStr::from_bytes(&name[..end])
}

/// What identifies a message for a release: store, content, base name.
type MessageKey = (usize, u128, OsString);

fn key_of(s: usize, rel: &Path, hash: u128) -> MessageKey {
    (s, hash, base_name(rel).to_os_string())
}

fn cost(rel: &Path) -> usize {
    2 * rel.as_os_str().len() + 100
}

/// The held names (see the module's text).
#[derive(Debug, Clone, Default)]
pub struct MayHaveMoved {
    /// By name: the content's hash and the delete's op.
    held: BTreeMap<(usize, PathBuf), (u128, u64)>,
    /// By message: the names held for it.
    by_message: HashMap<MessageKey, BTreeSet<PathBuf>>,
    bytes: usize,
    /// The last landings, by message, oldest first, and the name each
    /// landed at last.
    landed: VecDeque<MessageKey>,
    landed_at: HashMap<MessageKey, PathBuf>,
}

impl MayHaveMoved {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether another name may be held.
    pub fn has_room(&self) -> bool {
        self.bytes < MAY_HAVE_MOVED_BYTES_MAX
    }

    /// Where the same message as `rel` (content `hash`) landed lately
    /// under another name, if it did: the caller looks whether that name
    /// still holds it (a folder renamed since leaves the name behind).
    pub fn landed_elsewhere(&self, s: usize, rel: &Path, hash: u128) -> Option<&Path> {
        self.landed_at
            .get(&key_of(s, rel, hash))
            .map(PathBuf::as_path)
            .filter(|at| *at != rel)
    }

    /// An unsure delete of `rel` (op `seq`), the only copy here of content
    /// `hash`: whether it is held (not past the bound).
    pub fn hold(&mut self, s: usize, rel: &Path, hash: u128, seq: u64) -> bool {
        let name = (s, rel.to_path_buf());
        self.unhold(&name);
        if self.bytes + cost(rel) > MAY_HAVE_MOVED_BYTES_MAX {
            return false;
        }
        self.bytes += cost(rel);
        self.by_message
            .entry(key_of(s, rel, hash))
            .or_default()
            .insert(rel.to_path_buf());
        self.held.insert(name, (hash, seq));
        true
    }

    /// Whether `rel` is held.
    pub fn holds(&self, s: usize, rel: &Path) -> bool {
        self.held.contains_key(&(s, rel.to_path_buf()))
    }

    fn unhold(&mut self, name: &(usize, PathBuf)) -> Option<(u128, u64)> {
        let (hash, seq) = self.held.remove(name)?;
        self.bytes -= cost(&name.1);
        let key = key_of(name.0, &name.1, hash);
        if let Some(names) = self.by_message.get_mut(&key) {
            names.remove(&name.1);
            if names.is_empty() {
                self.by_message.remove(&key);
            }
        }
        Some((hash, seq))
    }

    /// Content `hash` landed at `rel`: the names held for the same message
    /// elsewhere, to delete now (it moved there); a name held at `rel`
    /// itself was replaced.
    #[must_use]
    pub fn landed(&mut self, s: usize, rel: &Path, hash: u128) -> Vec<PathBuf> {
        let key = key_of(s, rel, hash);
        if self
            .landed_at
            .insert(key.clone(), rel.to_path_buf())
            .is_none()
        {
            self.landed.push_back(key.clone());
            if self.landed.len() > RECENT_LANDINGS_MAX {
                if let Some(old) = self.landed.pop_front() {
                    self.landed_at.remove(&old);
                }
            }
        }
        if self.held.is_empty() {
            return Vec::new();
        }
        self.unhold(&(s, rel.to_path_buf()));
        let names: Vec<PathBuf> = self
            .by_message
            .get(&key)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        for p in &names {
            self.unhold(&(s, p.clone()));
        }
        names
    }

    /// The held names at or below `rel` of store `s` (and, with
    /// `above_too`, its folders'): held no more, the file kept (replaced,
    /// deleted, or carried by a rename: a name the primary renamed is not
    /// the name it found gone).
    pub fn let_go(&mut self, s: usize, rel: &Path, above_too: bool, older_than: Option<u64>) {
        if self.held.is_empty() {
            return;
        }
        let mut names = super::keys_below(&self.held, s, rel, true);
        if above_too {
            names.extend(
                rel.ancestors()
                    .skip(1)
                    .filter(|a| !a.as_os_str().is_empty())
                    .map(|a| (s, a.to_path_buf())),
            );
        }
        for name in names {
            let older = self
                .held
                .get(&name)
                .is_some_and(|(_, seq)| older_than.is_none_or(|later| *seq < later));
            if older {
                self.unhold(&name);
            }
        }
    }

    /// The next connection's receiver holds none: the primary's retry of
    /// them is gone with the session, and its next comparison finds the
    /// names still here and deletes them again, unsure. What landed
    /// stays remembered.
    pub fn for_next_session(&mut self) {
        self.held.clear();
        self.by_message.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_are_the_maildir_unique_part() {
        assert_eq!(
            base_name(Path::new("a/cur/123.M1P2.host:2,S")),
            "123.M1P2.host"
        );
        assert_eq!(base_name(Path::new("a/new/123.M1P2.host")), "123.M1P2.host");
        assert_eq!(
            base_name(Path::new("archive/2026/report.pdf")),
            "report.pdf"
        );
    }

    #[test]
    fn a_held_name_goes_when_its_message_lands_elsewhere_not_for_a_copy_under_another_name() {
        let p = Path::new;
        let mut m = MayHaveMoved::default();
        assert!(m.hold(0, p("a/new/m"), 7, 3));
        assert!(m.hold(0, p("a/new/n"), 8, 4));
        assert!(m.hold(1, p("a/new/m"), 7, 4));
        // The same bytes under another base name (a copy), other content,
        // another store: nothing.
        assert!(m.landed(0, p("b/cur/copy"), 7).is_empty());
        assert!(m.landed(0, p("b/cur/m:2,S"), 9).is_empty());
        assert!(m.holds(0, p("a/new/m")) && m.holds(1, p("a/new/m")));
        // The message lands under its new name: the old one goes, once.
        assert_eq!(m.landed(0, p("a/cur/m:2,S"), 7), [PathBuf::from("a/new/m")]);
        assert!(m.landed(0, p("a/cur/m:2,T"), 7).is_empty());
        assert!(m.holds(1, p("a/new/m")));
        // Where a message landed lately under another name is said (the
        // caller looks whether it is still there); not under its own name.
        assert_eq!(
            m.landed_elsewhere(0, p("a/new/m"), 7),
            Some(p("a/cur/m:2,T"))
        );
        let _ = m.landed(0, p("e/new/z"), 13);
        assert_eq!(m.landed_elsewhere(0, p("e/new/z"), 13), None);
        assert_eq!(m.landed_elsewhere(0, p("e/new/z"), 14), None);
        // A later delete of its folder ends a hold; an earlier op's does not.
        m.let_go(0, p("a/new/n"), true, Some(2));
        assert!(m.holds(0, p("a/new/n")));
        m.let_go(0, p("a"), true, Some(5));
        assert!(!m.holds(0, p("a/new/n")));
        // A rename carrying it (its folder's) ends it, the file kept.
        assert!(m.hold(0, p("c/new/x"), 11, 6));
        m.let_go(0, p("c"), false, None);
        assert!(!m.holds(0, p("c/new/x")));
        // A landing at the held name replaces it.
        assert!(m.landed(1, p("a/new/m"), 3).is_empty());
        assert!(m.is_empty());
        assert_eq!(m.bytes, 0);
        // The next session holds none.
        assert!(m.hold(0, p("d/new/y"), 12, 7));
        m.for_next_session();
        assert!(m.is_empty() && m.bytes == 0);
    }

    #[test]
    fn what_is_held_and_remembered_is_bounded() {
        let mut m = MayHaveMoved::default();
        let long = "x".repeat(4_000);
        let mut held = 0;
        while m.hold(0, &PathBuf::from(format!("{long}/{held}")), held as u128, 1) {
            held += 1;
        }
        assert!(m.bytes <= MAY_HAVE_MOVED_BYTES_MAX);
        assert!(held > 100 && held < 2_000, "{held} long names held");
        assert!(!m.has_room() || !m.hold(0, &PathBuf::from(format!("{long}/more")), 1, 1));
        for i in 0..RECENT_LANDINGS_MAX as u128 + 10 {
            let _ = m.landed(1, Path::new("new/m"), i);
        }
        assert_eq!(m.landed.len(), RECENT_LANDINGS_MAX);
        assert_eq!(m.landed_at.len(), RECENT_LANDINGS_MAX);
        // The oldest landings are forgotten: a message landed long ago
        // under another name does not keep a name from being held.
        assert!(m.landed_at.contains_key(&key_of(1, Path::new("new/m"), 10)));
        assert_eq!(m.landed_elsewhere(1, Path::new("cur/m:2,S"), 9), None);
        assert!(m.landed_elsewhere(1, Path::new("cur/m:2,S"), 10).is_some());
    }
}
