//! Content the primary sent under names where it found no room on this
//! replica: by store and name, its hash, size and the op that sent it.
//!
//! The replica's decisions ([`super::apply::Applier`]) hold back the delete
//! of a file whose content waits here under another name: a message moved
//! while the disk is full stays under its old name until the new one takes
//! it, so that it is never under neither (a failover then would find it
//! only on the other node). Sans-IO: the caller says what arrived, what
//! the primary said of a name, and how much room there is.
//!
//! Every lookup is by name (a range of the ordered map for a folder's
//! names) or by content and size (counted per store): nothing walks the
//! whole set per op, which holds up to [`WAITING_MAX`] names while a full
//! disk refuses every file.

mod moving;

pub use moving::{base_name, MayHaveMoved, MAY_HAVE_MOVED_BYTES_MAX, RECENT_LANDINGS_MAX};

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};

/// Bound on the names remembered (a path and 32 bytes each). Past it, a
/// delete is not held back for the names not remembered: the gap of a
/// replica that never held it (see INVARIANTS).
pub const WAITING_MAX: usize = 65_536;

/// What waits under one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub hash: u128,
    pub size: u64,
    /// The op that sent it (0: a session before this one).
    pub seq: u64,
}

impl Waiting {
    /// Content sent for a name and refused for want of room.
    pub fn for_room(hash: u128, size: u64, seq: u64) -> Waiting {
        Waiting { hash, size, seq }
    }
}

/// A rename that failed here (op `seq`, with an error the primary retries)
/// left its source, the only copy here of what the primary holds at `to`:
/// the primary's delete of the source is held back until `to` lands, at
/// most `holds_left` more times (a primary whose user deleted the message
/// never sends `to` again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub to: PathBuf,
    pub seq: u64,
    pub holds_left: u16,
}

/// How many times a delete is held back for a rename that failed (the
/// primary retries it every 250 ms: about 10 s for the target to land).
pub const RENAME_HOLDS_MAX: u16 = 40;

/// Bound on the sources remembered for failed renames (past it, a source
/// is not held: as before the hold existed).
pub const OWED_MAX: usize = 4_096;

/// How many times a delete is held back for content that found room here
/// under another name and is not sent again yet (the primary retries what
/// was refused for room within `NO_SPACE_RETRY_MAX`, 5 s; a held delete is
/// asked for again every 250 ms: about 10 s).
pub const RESEND_HOLDS_MAX: u16 = 40;

/// For how many of the store's space rechecks (one each 0.5 s at most
/// while it is full: about a minute) a folder's delete is held for content
/// below it that waits for room under another name. A file's delete frees
/// what it holds once the content lands; a folder may hold far more than
/// what waits, and deleted on a full disk it may be the room the content
/// waits for, so its hold ends.
pub const FOLDER_ROOM_HOLD_RECHECKS: u16 = 120;

/// The keys of `map` in store `s` at `rel` (if `with_rel`) and below it: in
/// path order a folder's names follow it, so one range of the ordered map.
fn keys_below<V>(
    map: &BTreeMap<(usize, PathBuf), V>,
    s: usize,
    rel: &Path,
    with_rel: bool,
) -> Vec<(usize, PathBuf)> {
    let key = (s, rel.to_path_buf());
    let start = if with_rel {
        Bound::Included(key)
    } else {
        Bound::Excluded(key)
    };
    map.range((start, Bound::Unbounded))
        .take_while(|((ks, p), _)| *ks == s && p.starts_with(rel))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Content waiting for room, by name, and the sources of failed renames
/// (see the module's text).
#[derive(Debug, Clone, Default)]
pub struct WaitingForRoom {
    by_name: BTreeMap<(usize, PathBuf), Waiting>,
    /// The names each content waits under (one, as a rule).
    by_content: HashMap<(usize, u128), Vec<PathBuf>>,
    by_size: HashMap<(usize, u64), u32>,
    /// Names of `by_name` whose content found room here
    /// ([`WaitingForRoom::room`]) and is not sent again yet, with the holds
    /// left: a delete of the same content elsewhere is still held (without
    /// counting the store as full) until it lands or the holds run out.
    /// Let go of at once, a copy refused for room, the room back, and the
    /// original's expunge before the copy was sent again left the message
    /// under neither name here (found by the data-path simulator, seed
    /// 19568).
    resend: HashMap<(usize, PathBuf), u16>,
    /// By source name: what a failed rename owes its target.
    owed: BTreeMap<(usize, PathBuf), Owed>,
    /// Folders whose delete was held for room, and the rechecks left.
    folder_room_holds: BTreeMap<(usize, PathBuf), u16>,
    /// Names an unsure delete held (the primary found them gone, maybe
    /// moved on).
    moving: MayHaveMoved,
}

impl WaitingForRoom {
    /// Nothing waits for room and no rename owes anything.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.owed.is_empty() && self.moving.is_empty()
    }

    /// Whether another name may be held by an unsure delete.
    pub fn may_hold_move(&self) -> bool {
        self.moving.has_room()
    }

    /// An unsure delete of `rel` (op `seq`), the only copy here of content
    /// `hash`: whether it is held, until the same message lands elsewhere
    /// ([`WaitingForRoom::moved_to`]) or the primary says something else
    /// of the name (see [`MayHaveMoved`]).
    pub fn hold_for_move(&mut self, s: usize, rel: &Path, hash: u128, seq: u64) -> bool {
        self.moving.hold(s, rel, hash, seq)
    }

    /// Where the same message as `rel` landed lately under another name.
    pub fn landed_elsewhere(&self, s: usize, rel: &Path, hash: u128) -> Option<&Path> {
        self.moving.landed_elsewhere(s, rel, hash)
    }

    /// Whether an unsure delete holds `rel` (for tests and status).
    pub fn holds_for_move(&self, s: usize, rel: &Path) -> bool {
        self.moving.holds(s, rel)
    }

    /// Content `hash` landed at `rel`: the names an unsure delete held for
    /// the same message, to delete now (it moved there).
    #[must_use]
    pub fn moved_to(&mut self, s: usize, rel: &Path, hash: u128) -> Vec<PathBuf> {
        self.moving.landed(s, rel, hash)
    }

    /// The names content waits for room under.
    pub fn len(&self) -> usize {
        self.by_name.len() - self.resend.len()
    }

    /// The names whose content found room here and is not sent again yet.
    pub fn awaited(&self) -> usize {
        self.resend.len()
    }

    /// Whether any content waits for room.
    pub fn any_for_room(&self) -> bool {
        !self.by_name.is_empty()
    }

    /// The rename `from` → `to` (op `seq`) failed here with an error the
    /// primary retries: `from` stays until `to` lands.
    pub fn owe(&mut self, s: usize, from: &Path, to: &Path, seq: u64) {
        let key = (s, from.to_path_buf());
        if self.owed.len() >= OWED_MAX && !self.owed.contains_key(&key) {
            return;
        }
        self.owed.insert(
            key,
            Owed {
                to: to.to_path_buf(),
                seq,
                holds_left: RENAME_HOLDS_MAX,
            },
        );
    }

    /// The primary deletes `rel`: whether the delete is held back (a
    /// failed rename owes it to a name that has not landed), spending one
    /// hold; the last one lets it go.
    pub fn hold_delete(&mut self, s: usize, rel: &Path) -> bool {
        if self.owed.is_empty() {
            return false;
        }
        let key = (s, rel.to_path_buf());
        let Some(o) = self.owed.get_mut(&key) else {
            return false;
        };
        // The target was refused for room and waits for it (not sent again
        // since room came): held without spending a hold, for as long as
        // the disk stays full (a full disk outlasts the primary's retries).
        let to = (s, o.to.clone());
        if self.by_name.contains_key(&to) && !self.resend.contains_key(&to) {
            return true;
        }
        if o.holds_left == 0 {
            self.owed.remove(&key);
            return false;
        }
        o.holds_left -= 1;
        true
    }

    /// The primary deletes folder `rel`: whether the delete is held back
    /// because a failed rename's source below it is owed to a name that
    /// has not landed (each such source spends one hold; those with none
    /// left let the folder go).
    pub fn hold_folder_delete(&mut self, s: usize, rel: &Path) -> bool {
        if self.owed.is_empty() {
            return false;
        }
        let below = keys_below(&self.owed, s, rel, false);
        let mut held = false;
        for k in below {
            if let Some(o) = self.owed.get_mut(&k) {
                if o.holds_left == 0 {
                    self.owed.remove(&k);
                } else {
                    o.holds_left -= 1;
                    held = true;
                }
            }
        }
        held
    }

    /// The primary deletes folder `rel`, below which content waits for
    /// room under another name: whether the delete is held (until
    /// [`FOLDER_ROOM_HOLD_RECHECKS`] space rechecks have passed since the
    /// first hold; past [`OWED_MAX`] folders, not held).
    pub fn hold_folder_for_room(&mut self, s: usize, rel: &Path) -> bool {
        let key = (s, rel.to_path_buf());
        if self.folder_room_holds.len() >= OWED_MAX && !self.folder_room_holds.contains_key(&key) {
            return false;
        }
        *self
            .folder_room_holds
            .entry(key)
            .or_insert(FOLDER_ROOM_HOLD_RECHECKS)
            > 0
    }

    /// `rel` (a file or a folder) was deleted here: the sources at or
    /// below it owe nothing any more, and a folder's holds for room end.
    pub fn deleted(&mut self, s: usize, rel: &Path) {
        self.moving.let_go(s, rel, false, None);
        if !self.folder_room_holds.is_empty() {
            let gone = keys_below(&self.folder_room_holds, s, rel, true);
            for k in gone {
                self.folder_room_holds.remove(&k);
            }
        }
        if self.owed.is_empty() {
            return;
        }
        let gone = keys_below(&self.owed, s, rel, true);
        for k in gone {
            self.owed.remove(&k);
        }
    }

    /// What a failed rename owes, by source (for tests and status).
    pub fn owed(&self, s: usize, from: &Path) -> Option<&Owed> {
        self.owed.get(&(s, from.to_path_buf()))
    }

    /// The owed sources whose target is at or below `rel`.
    fn owed_to_at_or_below(&self, s: usize, rel: &Path) -> Vec<(usize, PathBuf)> {
        self.owed
            .iter()
            .filter(|((os, _), o)| *os == s && o.to.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `rel` of store `s` waits with `w`; an entry there from a later op
    /// stays (an older op's file can fail after a newer one arrived).
    /// Past [`WAITING_MAX`] names, a new name is not remembered; nor is an
    /// empty file (no message, and every empty file shares its content).
    pub fn insert(&mut self, s: usize, rel: &Path, w: Waiting) {
        if w.size == 0 {
            return;
        }
        let key = (s, rel.to_path_buf());
        match self.by_name.get(&key) {
            Some(old) if old.seq > w.seq => return,
            Some(_) => {
                self.remove(&key);
            }
            None if self.by_name.len() >= WAITING_MAX => return,
            None => {}
        }
        self.by_content
            .entry((s, w.hash))
            .or_default()
            .push(rel.to_path_buf());
        *self.by_size.entry((s, w.size)).or_default() += 1;
        self.by_name.insert(key, w);
    }

    fn remove(&mut self, key: &(usize, PathBuf)) -> Option<Waiting> {
        let w = self.by_name.remove(key)?;
        self.resend.remove(key);
        if let Some(names) = self.by_content.get_mut(&(key.0, w.hash)) {
            names.retain(|p| *p != key.1);
            if names.is_empty() {
                self.by_content.remove(&(key.0, w.hash));
            }
        }
        if let Some(n) = self.by_size.get_mut(&(key.0, w.size)) {
            *n -= 1;
            if *n == 0 {
                self.by_size.remove(&(key.0, w.size));
            }
        }
        Some(w)
    }

    /// The names at or below `rel` (in path order a folder's names follow
    /// it).
    fn at_and_below(&self, s: usize, rel: &Path) -> Vec<(usize, PathBuf)> {
        keys_below(&self.by_name, s, rel, true)
    }

    /// Content `hash` landed at `rel` (op `seq`): it waits nowhere any
    /// more, and neither does what an earlier op sent for `rel`. A failed
    /// rename's target landing ends what it owed: returned are the sources
    /// whose delete the primary asked for meanwhile (held), to delete now
    /// rather than at the primary's next retry (both names would be on the
    /// disk until then: a duplicate at a failover).
    #[must_use]
    pub fn landed(&mut self, s: usize, rel: &Path, seq: u64, hash: u128) -> Vec<PathBuf> {
        let mut asked = Vec::new();
        if !self.owed.is_empty() {
            // Other content landed at a failed rename's source: the name no
            // longer holds what was owed (its delete, once the target
            // lands, would take the new file).
            let at = (s, rel.to_path_buf());
            if self.owed.get(&at).is_some_and(|o| o.seq <= seq) {
                self.owed.remove(&at);
            }
            let done: Vec<(usize, PathBuf)> = self
                .owed
                .iter()
                .filter(|((os, _), o)| *os == s && o.to == rel && o.seq <= seq)
                // Never the name that just landed.
                .filter(|((_, from), _)| from != rel)
                .map(|(k, _)| k.clone())
                .collect();
            for k in done {
                if let Some(o) = self.owed.remove(&k) {
                    if o.holds_left < RENAME_HOLDS_MAX {
                        asked.push(k.1);
                    }
                }
            }
        }
        self.landed_for_room(s, rel, seq, hash);
        asked
    }

    fn landed_for_room(&mut self, s: usize, rel: &Path, seq: u64, hash: u128) {
        if self.by_name.is_empty() {
            return;
        }
        let key = (s, rel.to_path_buf());
        if self.by_name.get(&key).is_some_and(|w| w.seq <= seq) {
            self.remove(&key);
        }
        if let Some(names) = self.by_content.get(&(s, hash)).cloned() {
            for p in names {
                self.remove(&(s, p));
            }
        }
    }

    /// The primary deleted or replaced `rel` (op `seq`): what an earlier op
    /// sent there waits no more, nor below it (or above it: a name under
    /// a former file). An unsure delete (`found_gone`: the primary found
    /// the name gone, maybe renamed to a name it has not sent yet) keeps
    /// what waits at and below it: the content is still wanted, under the
    /// new name, and a delete of the same content elsewhere stays held
    /// until it lands or there is room for it (seed 4757: the new name
    /// refused for room, renamed again, and the old name's sure delete
    /// came before the newest name was sent). What waits holds no disk.
    pub fn forget(&mut self, s: usize, rel: &Path, seq: u64, found_gone: bool) {
        // Said again (a sure delete, say) or replaced: not held.
        self.moving.let_go(s, rel, true, Some(seq));
        if !self.owed.is_empty() && !found_gone {
            // The target deleted (or its folder): nothing is owed it. (A
            // folder deleted over a source is held as the source's own
            // delete is: `hold_folder_delete`; `deleted` once it goes.)
            // Found gone (an unsure delete: maybe renamed on to a name
            // not sent yet), it is still owed, as what waits for room is
            // (the holds left bound it).
            for k in self.owed_to_at_or_below(s, rel) {
                if self.owed.get(&k).is_some_and(|o| o.seq < seq) {
                    self.owed.remove(&k);
                }
            }
        }
        if self.by_name.is_empty() {
            return;
        }
        let mut keys: Vec<(usize, PathBuf)> = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .map(|a| (s, a.to_path_buf()))
            .collect();
        if !found_gone {
            keys.extend(self.at_and_below(s, rel));
        }
        for key in keys {
            if self.by_name.get(&key).is_some_and(|w| w.seq < seq) {
                self.remove(&key);
            }
        }
    }

    /// The primary renamed `from` to `to`: what waited at or below `from`
    /// now waits under `to` (the content is wanted there), and what waited
    /// at or below `to` goes (replaced there).
    pub fn rename(&mut self, s: usize, from: &Path, to: &Path) {
        // Held names replaced at `to` go, and so do those the rename
        // carries (a name the primary renamed is not one it found gone:
        // held under its new name, a landing of the same message elsewhere
        // would delete a live name).
        self.moving.let_go(s, to, false, None);
        self.moving.let_go(s, from, false, None);
        if !self.owed.is_empty() {
            // A target replaced goes, and so does a source replaced (the
            // name holds other content now, or the message itself renamed
            // back onto it: nothing is owed it); a target moved on is owed
            // under its new name; a source moved (its folder renamed) is
            // held there.
            for k in self.owed_to_at_or_below(s, to) {
                self.owed.remove(&k);
            }
            let replaced = keys_below(&self.owed, s, to, true);
            for k in replaced {
                self.owed.remove(&k);
            }
            for k in self.owed_to_at_or_below(s, from) {
                if let Some(o) = self.owed.get_mut(&k) {
                    if let Some(moved) = super::moved_path(&o.to, from, to) {
                        o.to = moved;
                    }
                }
            }
            let sources = keys_below(&self.owed, s, from, true);
            for k in sources {
                if let (Some(o), Some(moved)) =
                    (self.owed.remove(&k), super::moved_path(&k.1, from, to))
                {
                    self.owed.insert((s, moved), o);
                }
            }
        }
        if self.by_name.is_empty() {
            return;
        }
        let moving: Vec<((usize, PathBuf), Waiting, Option<u16>)> = self
            .at_and_below(s, from)
            .into_iter()
            .filter_map(|k| {
                let resend = self.resend.get(&k).copied();
                self.remove(&k).map(|w| (k, w, resend))
            })
            .collect();
        for k in self.at_and_below(s, to) {
            self.remove(&k);
        }
        for ((_, p), w, resend) in moving {
            if let Some(moved) = super::moved_path(&p, from, to) {
                self.insert(s, &moved, w);
                if let Some(left) = resend {
                    if self.by_name.contains_key(&(s, moved.clone())) {
                        self.resend.insert((s, moved), left);
                    }
                }
            }
        }
    }

    /// Store `s` has `free` bytes for files now: as much as fits of what
    /// waits for room, in path order, waits no more for room, only for the
    /// primary to send it again (it lands, or waits for room again). A
    /// delete of the same content elsewhere stays held meanwhile, a bounded
    /// number of times (see `resend`), without counting the store as full.
    pub fn room(&mut self, s: usize, free: u64) {
        for (_, left) in self
            .folder_room_holds
            .iter_mut()
            .filter(|((fs, _), _)| *fs == s)
        {
            *left = left.saturating_sub(1);
        }
        let mut left = free;
        let fits: Vec<(usize, PathBuf)> = self
            .by_name
            .iter()
            .filter(|(k, _)| k.0 == s && !self.resend.contains_key(*k))
            .filter(|(_, w)| {
                let fits = w.size <= left;
                if fits {
                    left -= w.size;
                }
                fits
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in fits {
            self.resend.insert(k, RESEND_HOLDS_MAX);
        }
    }

    /// Whether something of `size` bytes waits in store `s` (a cheap test
    /// before the content of a file is looked up).
    pub fn size_waits(&self, s: usize, size: u64) -> bool {
        self.by_size.contains_key(&(s, size))
    }

    /// Whether content `hash` waits for room in store `s` under a name
    /// other than `rel`.
    pub fn waits_elsewhere(&self, s: usize, rel: &Path, hash: u128) -> bool {
        self.by_content.get(&(s, hash)).is_some_and(|names| {
            names
                .iter()
                .any(|p| p != rel && !self.resend.contains_key(&(s, p.clone())))
        })
    }

    /// A delete of `rel`, content `hash`, while the same content found
    /// room under another name and is not sent again yet: whether it is
    /// held, spending one hold of each such name (one with none left waits
    /// no more).
    pub fn hold_for_resend(&mut self, s: usize, rel: &Path, hash: u128) -> bool {
        if self.resend.is_empty() {
            return false;
        }
        let Some(names) = self.by_content.get(&(s, hash)) else {
            return false;
        };
        let names: Vec<PathBuf> = names.iter().filter(|p| *p != rel).cloned().collect();
        let mut held = false;
        for p in names {
            let key = (s, p);
            match self.resend.get_mut(&key) {
                Some(0) => {
                    self.remove(&key);
                }
                Some(left) => {
                    *left -= 1;
                    held = true;
                }
                None => {}
            }
        }
        held
    }

    /// The same names for the next connection's receiver (its session's
    /// seqs start afresh: any file that lands there counts as later).
    pub fn for_next_session(self) -> WaitingForRoom {
        let mut next = self;
        for w in next.by_name.values_mut() {
            w.seq = 0;
        }
        for o in next.owed.values_mut() {
            o.seq = 0;
        }
        next.moving.for_next_session();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(hash: u128, size: u64, seq: u64) -> Waiting {
        Waiting::for_room(hash, size, seq)
    }

    #[test]
    fn what_waits_goes_when_its_content_lands_anywhere_or_its_name_takes_a_later_file() {
        let mut r = WaitingForRoom::default();
        r.insert(0, Path::new("cur/m:2,S"), w(7, 100, 5));
        assert!(r.waits_elsewhere(0, Path::new("new/m"), 7));
        assert!(!r.waits_elsewhere(0, Path::new("cur/m:2,S"), 7));
        assert!(r.size_waits(0, 100) && !r.size_waits(1, 100));
        // An older op's failure does not replace a later one's.
        r.insert(0, Path::new("cur/m:2,S"), w(6, 90, 4));
        assert!(r.waits_elsewhere(0, Path::new("new/m"), 7));
        // An older op's file landing there leaves it waiting.
        assert!(r.landed(0, Path::new("cur/m:2,S"), 4, 6).is_empty());
        assert_eq!(r.len(), 1);
        // Its content landing under any name lets it go.
        assert!(r.landed(0, Path::new(".Trash/cur/m:2,S"), 9, 7).is_empty());
        assert!(r.is_empty() && !r.size_waits(0, 100));
        // A later file at its name, with other content, too.
        r.insert(0, Path::new("a"), w(1, 10, 3));
        assert!(r.landed(0, Path::new("a"), 8, 2).is_empty());
        assert!(r.is_empty());
        // Deleted by a later op, or its folder: it goes; an empty file is
        // never remembered.
        r.insert(0, Path::new("f/cur/a"), w(1, 10, 3));
        r.insert(0, Path::new("f/cur/b"), w(2, 10, 3));
        r.insert(0, Path::new("g"), w(3, 10, 3));
        r.insert(0, Path::new("e"), w(4, 0, 3));
        r.forget(0, Path::new("f/cur/a"), 3, false);
        assert_eq!(r.len(), 3, "said by the op that sent it");
        // Found gone (an unsure delete: maybe renamed to a name not sent
        // yet): the content still waits, and holds a delete of the same
        // content elsewhere, until it lands or fits.
        r.forget(0, Path::new("f/cur/a"), 4, true);
        r.forget(0, Path::new("f"), 4, true);
        assert_eq!(r.len(), 3, "an unsure delete keeps what waits");
        assert!(r.waits_elsewhere(0, Path::new("f/new/a"), 1));
        r.forget(0, Path::new("f"), 4, false);
        assert_eq!(r.len(), 1);
        r.forget(0, Path::new("g/x"), 4, false);
        assert!(r.is_empty(), "a name below a former file");
    }

    #[test]
    fn a_rename_moves_what_waits_and_what_fits_is_awaited_a_bounded_while() {
        let mut r = WaitingForRoom::default();
        r.insert(0, Path::new("a/new/m"), w(1, 10, 3));
        r.insert(0, Path::new("b/old"), w(2, 500, 3));
        r.rename(0, Path::new("a"), Path::new("b"));
        assert!(r.waits_elsewhere(0, Path::new("x"), 1));
        assert!(!r.waits_elsewhere(0, Path::new("x"), 2), "b was replaced");
        assert!(!r.waits_elsewhere(0, Path::new("b/new/m"), 1));
        let mut r = r.for_next_session();
        r.room(0, 10);
        assert!(!r.waits_elsewhere(0, Path::new("x"), 1));
        // It fits now, not sent again yet: a delete of its content
        // elsewhere is still held (not for room), a bounded number of
        // times; its landing lets go of it.
        assert!(r.hold_for_resend(0, Path::new("x"), 1));
        assert!(
            !r.hold_for_resend(0, Path::new("b/new/m"), 1),
            "its own name"
        );
        assert!(r.landed(0, Path::new("b/new/m"), 1, 1).is_empty());
        assert!(!r.hold_for_resend(0, Path::new("x"), 1) && r.is_empty());
        r.insert(0, Path::new("c"), w(4, 1000, 1));
        r.insert(0, Path::new("c2"), w(6, 995, 1));
        r.room(0, 1005);
        assert!(
            !r.waits_elsewhere(0, Path::new("x"), 4),
            "the first that fits"
        );
        assert!(
            r.waits_elsewhere(0, Path::new("x"), 6),
            "room for one of them"
        );
        r.room(0, 1005);
        assert!(!r.waits_elsewhere(0, Path::new("x"), 6));
        // Refused for room again: it waits for room again.
        r.insert(0, Path::new("c"), w(4, 1000, 1));
        assert!(r.waits_elsewhere(0, Path::new("x"), 4));
        // Any file landing at a name in the next session counts as later.
        r.insert(0, Path::new("d"), w(5, 1, 7));
        let mut r = r.for_next_session();
        assert!(r.landed(0, Path::new("d"), 1, 9).is_empty());
        assert!(!r.waits_elsewhere(0, Path::new("x"), 5));
        assert_eq!(
            (r.len(), r.awaited()),
            (1, 1),
            "c waits for room, c2 for its resend"
        );
        // What fits and is renamed is awaited under its new name.
        r.rename(0, Path::new("c2"), Path::new("e/c2"));
        assert!(!r.waits_elsewhere(0, Path::new("x"), 6));
        for _ in 0..RESEND_HOLDS_MAX {
            assert!(r.hold_for_resend(0, Path::new("x"), 6));
        }
        assert!(
            !r.hold_for_resend(0, Path::new("x"), 6),
            "the holds ran out"
        );
        assert_eq!((r.len(), r.awaited()), (1, 0));
    }

    #[test]
    fn what_a_failed_rename_owes_follows_its_names_and_ends_when_its_target_lands() {
        let p = Path::new;
        let mut r = WaitingForRoom::default();
        r.owe(0, p("a/new/m"), p("a/cur/m:2,S"), 5);
        assert!(!r.is_empty() && !r.any_for_room());
        // Other names, other stores, are not held.
        assert!(!r.hold_delete(0, p("a/new/other")) && !r.hold_delete(1, p("a/new/m")));
        // The target renamed on (a second flag): owed there.
        r.rename(0, p("a/cur/m:2,S"), p("a/cur/m:2,SR"));
        assert_eq!(r.owed(0, p("a/new/m")).unwrap().to, p("a/cur/m:2,SR"));
        // The source's folder renamed: held under its new name.
        r.rename(0, p("a"), p("b"));
        assert!(r.owed(0, p("a/new/m")).is_none());
        let o = r.owed(0, p("b/new/m")).unwrap();
        assert_eq!(o.to, p("b/cur/m:2,SR"));
        assert!(r.hold_delete(0, p("b/new/m")));
        // The same bytes landing elsewhere change nothing; an older op's
        // landing at the target neither.
        assert!(r.landed(0, p("b/cur/copy"), 9, 7).is_empty());
        assert!(r.landed(0, p("b/cur/m:2,SR"), 4, 7).is_empty());
        assert!(r.owed(0, p("b/new/m")).is_some());
        // The target landing ends it: the source, whose delete was asked
        // for, is returned to go with it.
        let next = r.for_next_session();
        let mut r = next;
        assert_eq!(r.landed(0, p("b/cur/m:2,SR"), 1, 7), [p("b/new/m")]);
        assert!(r.is_empty());
        // Not asked for yet: nothing to delete.
        r.owe(0, p("x/new/m"), p("x/cur/m:2,S"), 2);
        assert!(r.landed(0, p("x/cur/m:2,S"), 3, 7).is_empty());
        assert!(r.is_empty());
        // The target's folder deleted by a later op, or the target
        // replaced by a rename onto it: nothing is owed.
        r.owe(0, p("x/new/m"), p("x/cur/m:2,S"), 4);
        r.forget(0, p("x/cur"), 5, false);
        assert!(r.is_empty());
        r.owe(0, p("x/new/m"), p("x/cur/m:2,S"), 6);
        r.rename(0, p("x/new/other"), p("x/cur/m:2,S"));
        assert!(r.is_empty());
        // The target found gone (an unsure delete: maybe renamed on to a
        // name not sent yet): still owed.
        r.owe(0, p("x/new/m"), p("x/cur/m:2,S"), 6);
        r.forget(0, p("x/cur/m:2,S"), 7, true);
        assert!(r.owed(0, p("x/new/m")).is_some());
        // Other content landing at the source (a later op): the name no
        // longer holds what was owed, and the target's landing deletes
        // nothing.
        assert!(r.hold_delete(0, p("x/new/m")));
        assert!(r.landed(0, p("x/new/m"), 8, 9).is_empty());
        assert!(r.is_empty());
        assert!(r.landed(0, p("x/cur/m:2,S"), 9, 7).is_empty());
        // The target refused for room: the source is held, without
        // spending a hold, while it waits; once room came, holds count.
        r.owe(0, p("x/new/m"), p("x/cur/m:2,S"), 10);
        r.insert(0, p("x/cur/m:2,S"), Waiting::for_room(7, 100, 11));
        for _ in 0..RENAME_HOLDS_MAX + 5 {
            assert!(r.hold_delete(0, p("x/new/m")));
        }
        r.room(0, 1_000);
        for _ in 0..RENAME_HOLDS_MAX {
            assert!(r.hold_delete(0, p("x/new/m")));
        }
        assert!(!r.hold_delete(0, p("x/new/m")), "the holds ran out");
        r.forget(0, p("x/cur/m:2,S"), 12, false);
        assert!(r.is_empty());
        // The message renamed back onto its source (a flag set and taken
        // away again): the source is not owed to itself, and its landing
        // there does not delete it.
        r.owe(0, p("x/cur/m:2,S"), p("x/cur/m:2,SR"), 6);
        r.rename(0, p("x/cur/m:2,SR"), p("x/cur/m:2,S"));
        assert!(r.is_empty());
        assert!(r.landed(0, p("x/cur/m:2,S"), 7, 7).is_empty());
        // A folder deleted over the source is held as the source's own
        // delete is, until the holds run out; once deleted, nothing is
        // owed.
        r.owe(0, p("y/new/m"), p("z/cur/m"), 7);
        r.forget(0, p("y"), 8, false);
        assert!(r.owed(0, p("y/new/m")).is_some());
        assert!(!r.hold_folder_delete(0, p("x")) && !r.hold_folder_delete(0, p("y/new/m")));
        for _ in 0..RENAME_HOLDS_MAX {
            assert!(r.hold_folder_delete(0, p("y")));
        }
        assert!(!r.hold_folder_delete(0, p("y")));
        assert!(r.is_empty());
        r.owe(0, p("y/new/m"), p("z/cur/m"), 7);
        r.deleted(0, p("y"));
        assert!(r.is_empty());
        // Bounded.
        for i in 0..OWED_MAX + 10 {
            r.owe(0, &PathBuf::from(format!("n/{i}")), p("t"), 9);
        }
        assert_eq!(r.owed.len(), OWED_MAX);
    }

    #[test]
    fn a_name_held_in_case_it_moved_ends_at_what_the_primary_says_of_it() {
        let p = Path::new;
        let mut r = WaitingForRoom::default();
        assert!(r.hold_for_move(0, p("a/new/m"), 7, 3));
        assert!(!r.is_empty());
        // Its folder renamed: not held any more (a renamed name is not
        // the one the primary found gone), the file kept.
        r.rename(0, p("a"), p("b"));
        assert!(!r.holds_for_move(0, p("a/new/m")) && !r.holds_for_move(0, p("b/new/m")));
        // A rename onto it, a later delete, a landing of the message
        // elsewhere, the next session: each ends it.
        assert!(r.hold_for_move(0, p("a/new/m"), 7, 3));
        r.rename(0, p("a/new/o"), p("a/new/m"));
        assert!(!r.holds_for_move(0, p("a/new/m")));
        assert!(r.hold_for_move(0, p("a/new/m"), 7, 3));
        r.forget(0, p("a/new/m"), 2, false);
        assert!(r.holds_for_move(0, p("a/new/m")), "an earlier op's delete");
        r.forget(0, p("a/new/m"), 4, false);
        assert!(!r.holds_for_move(0, p("a/new/m")));
        assert!(r.hold_for_move(0, p("a/new/m"), 7, 5));
        assert_eq!(
            r.moved_to(0, p("a/cur/m:2,S"), 7),
            [PathBuf::from("a/new/m")]
        );
        assert!(r.is_empty());
        assert!(r.hold_for_move(0, p("c/new/n"), 8, 6));
        let r = r.for_next_session();
        assert!(r.is_empty());
    }
}
