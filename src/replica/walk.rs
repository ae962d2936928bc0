//! A store walked one folder at a time, in path order.
//!
//! A [`Walk`] yields every entry of a store (its path, lstat and hash when
//! known) in [`path_order`](crate::model::path_order): a folder, then
//! everything below it, then its next sibling. It lists (and stats, and
//! hashes where the index has no hash) a folder's entries as it enters the
//! folder, so what it holds at any moment is the folders along the current
//! path and their entries not yet yielded: the largest folder, not the
//! tree. The comparison that starts a session and the replica's manifest
//! consume it as they go; a million-file store is never listed into memory.
//!
//! The index is updated as the walk goes (hashes of what changed) and,
//! once the walk has yielded everything, forgets what the walk did not
//! find: entries the walk did not visit and that nothing set or moved
//! meanwhile (see [`Index::begin_walk`]).
//!
//! The same walk runs over the real [`Tree`](super::tree::Tree) and over
//! the data-path simulator's model (both [`LocalTree`]).

use std::ffi::{OsStr, OsString};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};

use super::index::{Entry, Index, Kind, Rehash, Scan, ScanEntries, ScanEntry, Stat};
use super::tree::LocalTree;
use super::Excludes;

/// A walk of one store under way (see the module's text).
#[derive(Debug)]
pub struct Walk {
    rehash: Rehash,
    /// Hash files the index has no hash for (the replica's manifest), or
    /// leave them `None` for the caller to hash if it must (the primary: an
    /// initial sync to an empty replica reads nothing twice).
    hash_uncached: bool,
    /// This walk's mark in the index ([`Index::begin_walk`]).
    mark: u8,
    /// Per folder on the current path: its entries not yet yielded, last
    /// first (popped in path order).
    stack: Vec<Vec<ScanEntry>>,
    started: bool,
    finished: bool,
    /// Paths too long to replicate (not entered).
    pub too_long: Vec<PathBuf>,
    /// Folders listed that had vanished (renamed away, removed, replaced
    /// by another) when the walk came to enter them: what was below them
    /// was not walked.
    pub vanished: usize,
}

impl Walk {
    /// A walk of the store `index` describes; nothing is read until
    /// [`Walk::next`].
    pub fn new(index: &mut Index, rehash: Rehash, hash_uncached: bool) -> Walk {
        Walk {
            rehash,
            hash_uncached,
            mark: index.begin_walk(),
            stack: Vec::new(),
            started: false,
            finished: false,
            too_long: Vec::new(),
            vanished: 0,
        }
    }

    /// The next entry in path order, `None` once every entry was yielded
    /// (the index has forgotten what the walk did not find by then).
    ///
    /// An error names the path; the walk cannot go on after it.
    pub fn next<T: LocalTree + ?Sized>(
        &mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
    ) -> io::Result<Option<ScanEntry>> {
        if !self.started {
            self.started = true;
            self.enter(tree, index, excludes, Path::new(""), None)?;
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                if !self.finished {
                    self.finished = true;
                    index.end_walk(self.mark);
                }
                return Ok(None);
            };
            let Some(entry) = top.pop() else {
                self.stack.pop();
                continue;
            };
            if entry.1.kind == Kind::Dir {
                let listed_ino = entry.1.version.ino;
                self.enter(tree, index, excludes, &entry.0, Some(listed_ino))?;
            }
            return Ok(Some(entry));
        }
    }

    /// Every entry at once, in path order (a store small enough to hold,
    /// or a caller that needs all of it).
    pub fn collect<T: LocalTree + ?Sized>(
        mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
    ) -> io::Result<Scan> {
        let mut entries = ScanEntries::new();
        while let Some(e) = self.next(tree, index, excludes)? {
            entries.push(&e);
        }
        Ok(Scan {
            entries,
            too_long: self.too_long,
            vanished: self.vanished,
        })
    }

    /// Lists folder `dir`: its entries, stat'ed, hashed as the index and
    /// this walk say, onto the stack in path order. `listed_ino`: the
    /// folder's inode as its parent's listing found it.
    fn enter<T: LocalTree + ?Sized>(
        &mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
        dir: &Path,
        listed_ino: Option<u64>,
    ) -> io::Result<()> {
        let named = |rel: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("{}: {e}", tree.abs(rel).display()))
        };
        let full_verify = self.rehash != Rehash::Changed;
        let from_disk = self.rehash == Rehash::FromDisk;
        let Some(folder) = tree.open_folder(dir).map_err(|e| named(dir, e))? else {
            // Vanished (or replaced) while we walked: the tracker reports
            // it, but what was below it is unknown (see `vanished`).
            self.vanished += 1;
            return Ok(());
        };
        // Another folder of the same name (the one listed renamed away,
        // this one made since): listed as what is here now, but the one
        // that was listed went unwalked.
        if let Some(ino) = listed_ino {
            let here = tree.lstat(dir).map_err(|e| named(dir, e))?;
            if here.map(|st| st.version.ino) != Some(ino) {
                self.vanished += 1;
            }
        }
        let mut listed = tree.read_folder(&folder, dir).map_err(|e| named(dir, e))?;
        // Siblings in byte order of their names are in path order (a name
        // holds no '/').
        listed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(listed.len());
        for (name, st) in listed {
            let rel = dir.join(&name);
            if excludes.is_excluded(&rel) {
                continue;
            }
            if !super::tree::fits(&rel) {
                self.too_long.push(rel);
                continue;
            }
            let cached = index.visit(&rel, self.mark).filter(|e| {
                !full_verify
                    && e.kind == st.kind
                    && super::index::same_version(&e.version, &st.version)
            });
            let hash = match cached {
                Some(e) => Some(e.hash()),
                None if !self.hash_uncached && st.kind == Kind::File => None,
                None => match tree.hash_in(&folder, dir, &name, st.kind, from_disk) {
                    Ok(h) => {
                        let synced = index
                            .get(&rel)
                            .is_some_and(|e| e.synced && e.hash() == h && e.kind == st.kind);
                        index.set(rel.clone(), Entry::new(&st, h, synced));
                        Some(h)
                    }
                    // Gone since it was listed: forgotten (it was found).
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        index.remove_tree(&rel);
                        continue;
                    }
                    Err(e) => return Err(named(&rel, e)),
                },
            };
            out.push((rel, st, hash));
        }
        // Popped from the end.
        out.reverse();
        self.stack.push(out);
        Ok(())
    }
}

/// Scans taken before a session (the takeover record's, the replica's
/// while the pair forms) are kept for its first comparison, packed, up to
/// this many bytes over all of a node's stores (about 50 bytes a Maildir
/// entry with its hash: 1.3 million entries), and up to
/// [`HELD_UNSIZED_ENTRIES_MAX`] entries of a store whose size the index
/// does not know: a store beyond that is walked again then, one folder at
/// a time, its hashes in the index and its metadata in the kernel's cache
/// by then. Holding spares a restart that second walk (0.9 s of a
/// 202,000-file store's catch-up).
pub const HELD_BYTES_MAX: usize = 64 << 20;

/// Fewer bytes than any Maildir entry with its hash packs into (about 50
/// measured): a store the index knows to have more entries than the budget
/// holds at this size is not held at all.
const PACKED_ENTRY_BYTES_MIN: usize = 24;

/// What a walk holds where the index does not know the store's size (its
/// first walk, before an initial sync), or knows less than this: the store
/// may be far larger, and memory spent on a list that is dropped at the
/// budget would add to the initial sync's own peak. Beyond it, a walk holds
/// at most a quarter more than the index knows.
pub const HELD_UNSIZED_ENTRIES_MAX: usize = 65_536;

impl Walk {
    /// Walks to the end, showing `each` every entry; returns them all if
    /// they pack into at most `held_bytes_max` (see [`HELD_BYTES_MAX`]).
    pub fn run<T: LocalTree + ?Sized>(
        mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
        held_bytes_max: usize,
        mut each: impl FnMut(&ScanEntry),
    ) -> io::Result<Option<Scan>> {
        // Not tried where the index knows more entries than the budget
        // could hold packed at their smallest (a list built only to be
        // dropped would add to the peak). Where the index knows less than
        // the store holds (a first walk, an initial sync resumed, a store
        // grown while the node was down), at most what it knows and a
        // quarter more, or the unsized budget.
        let known = index.len_hint();
        let held_max = HELD_UNSIZED_ENTRIES_MAX.max(known.saturating_add(known / 4));
        let mut held =
            (known.saturating_mul(PACKED_ENTRY_BYTES_MIN) <= held_bytes_max).then(ScanEntries::new);
        while let Some(e) = self.next(tree, index, excludes)? {
            each(&e);
            if let Some(v) = held.as_mut() {
                v.push(&e);
                if v.len() > held_max || v.held_bytes() > held_bytes_max {
                    held = None;
                }
            }
        }
        Ok(held.map(|entries| Scan {
            entries,
            too_long: self.too_long,
            vanished: self.vanished,
        }))
    }
}

/// A store's entries in path order, one at a time: a scan held whole, or
/// a walk that lists each folder as it reaches it.
#[derive(Debug)]
pub struct Ordered {
    source: Source,
    peeked: Option<ScanEntry>,
    /// Entries taken so far.
    pub taken: usize,
}

#[derive(Debug)]
enum Source {
    /// The entries, the paths too long, the folders that vanished while
    /// the walk ran.
    Held(ScanEntries, Vec<PathBuf>, usize),
    Walking(Walk),
}

impl Ordered {
    pub fn held(scan: Scan) -> Ordered {
        Ordered {
            source: Source::Held(scan.entries, scan.too_long, scan.vanished),
            peeked: None,
            taken: 0,
        }
    }

    pub fn walk(walk: Walk) -> Ordered {
        Ordered {
            source: Source::Walking(walk),
            peeked: None,
            taken: 0,
        }
    }

    /// Whether the entries come from a walk not yet begun (none listed
    /// yet), not from a scan taken earlier.
    pub fn walk_not_begun(&self) -> bool {
        matches!(&self.source, Source::Walking(w) if !w.started) && self.peeked.is_none()
    }

    /// The next entry, if `pred` holds for it (else it stays next).
    pub fn next_if<T: LocalTree + ?Sized>(
        &mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
        pred: impl FnOnce(&ScanEntry) -> bool,
    ) -> io::Result<Option<ScanEntry>> {
        if self.peeked.is_none() {
            self.peeked = match &mut self.source {
                Source::Held(held, ..) => held.pop_front(),
                Source::Walking(w) => w.next(tree, index, excludes)?,
            };
        }
        let next = self.peeked.take_if(|e| pred(e));
        self.taken += usize::from(next.is_some());
        Ok(next)
    }

    /// Whether every entry was taken.
    pub fn at_end<T: LocalTree + ?Sized>(
        &mut self,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
    ) -> io::Result<bool> {
        self.next_if(tree, index, excludes, |_| false)?;
        Ok(self.peeked.is_none())
    }

    /// Folders that vanished before the walk entered them (for a held
    /// scan, while the walk that took it ran: a first comparison from it
    /// is no more sure of what lay below them than a walking one).
    pub fn vanished(&self) -> usize {
        match &self.source {
            Source::Held(_, _, vanished) => *vanished,
            Source::Walking(w) => w.vanished,
        }
    }

    /// Paths found too long to replicate so far (each once).
    pub fn take_too_long(&mut self) -> Vec<PathBuf> {
        match &mut self.source {
            Source::Held(_, v, _) => std::mem::take(v),
            Source::Walking(w) => std::mem::take(&mut w.too_long),
        }
    }
}

/// One entry of a folder as [`LocalTree::read_folder`] lists it.
pub type Listed = (OsString, Stat);

/// Reads a real folder's entries with one `statx` each, relative to the
/// folder's descriptor (depth and the root's path length do not matter).
/// Entries that vanish meanwhile, and sockets, fifos and devices, are left
/// out.
pub fn read_real_folder(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<Listed>> {
    use rustix::fs::{AtFlags, StatxFlags};
    use std::os::unix::ffi::OsStrExt;
    let mut listing = rustix::fs::Dir::read_from(fd)?;
    let mut out = Vec::new();
    while let Some(ent) = listing.read() {
        let ent = ent?;
        let name = ent.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let st = match super::index::stat_of(rustix::fs::statx(
            fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS,
        )) {
            Ok(Some(st)) => st,
            Ok(None) => continue,
            Err(e) => {
                let shown = OsStr::from_bytes(name.to_bytes())
                    .to_string_lossy()
                    .into_owned();
                return Err(io::Error::new(e.kind(), format!("{shown}: {e}")));
            }
        };
        out.push((OsStr::from_bytes(name.to_bytes()).to_os_string(), st));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::tree::Tree;

    fn tree_with(dir: &Path, files: &[&str]) -> Tree {
        for f in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f.as_bytes()).unwrap();
        }
        Tree::open(dir).unwrap()
    }

    /// A tree of `files` (each holding its own name), no excludes, and an
    /// empty index.
    fn fixture(files: &[&str]) -> (tempfile::TempDir, Tree, Excludes, Index) {
        let dir = tempfile::tempdir().unwrap();
        let t = tree_with(dir.path(), files);
        (dir, t, Excludes::new(&[]).unwrap(), Index::in_memory())
    }

    fn names(entries: &[ScanEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.0.to_string_lossy().into_owned())
            .collect()
    }

    /// A held scan of a Maildir tree, hashed, comes back exactly as the
    /// walk gave it, in a fraction of what its entries take unpacked (less
    /// than half with the paths' shared beginnings left out: a list this
    /// small is not deflated, see `packed`).
    #[test]
    fn a_held_scan_comes_back_whole_in_a_fraction_of_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        let names = crate::replica::packed::maildir_names(3_000, 30, true);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = tree_with(dir.path(), &refs);
        let excludes = Excludes::new(&[]).unwrap();
        let mut index = Index::in_memory();
        let mut walked = Vec::new();
        let held = Walk::new(&mut index, Rehash::Changed, true)
            .run(&t, &mut index, &excludes, usize::MAX, |e| {
                walked.push(e.clone())
            })
            .unwrap()
            .unwrap();
        let unpacked: usize = walked
            .iter()
            .map(|e| std::mem::size_of::<ScanEntry>() + e.0.as_os_str().len())
            .sum();
        let bytes = held.entries.held_bytes();
        assert!(
            bytes * 2 < unpacked,
            "{bytes} bytes held for {} entries ({unpacked} unpacked)",
            walked.len()
        );
        assert!(walked.iter().all(|e| e.2.is_some()), "hashed");
        assert_eq!(held.entries.collect::<Vec<_>>(), walked);
    }

    #[test]
    fn a_walk_holds_its_entries_only_within_the_budget() {
        let (_dir, t, excludes, mut index) = fixture(&["a/1", "a/2", "b"]);
        let held = Walk::new(&mut index, Rehash::Changed, true)
            .run(&t, &mut index, &excludes, 1 << 20, |_| {})
            .unwrap()
            .unwrap();
        let bytes = held.entries.held_bytes();
        let held: Vec<_> = held.entries.collect();
        assert_eq!(names(&held), ["a", "a/1", "a/2", "b"]);
        // Exactly the budget: held.
        let again = Walk::new(&mut index, Rehash::Changed, true)
            .run(&t, &mut index, &excludes, bytes, |_| {})
            .unwrap();
        assert_eq!(again.map(|s| s.entries.len()), Some(4));
        // Beyond the budget: not held, every entry still shown.
        let mut shown = 0;
        let held = Walk::new(&mut index, Rehash::Changed, true)
            .run(&t, &mut index, &excludes, bytes - 1, |_| shown += 1)
            .unwrap();
        assert!(held.is_none());
        assert_eq!(shown, 4);
    }

    #[test]
    fn a_walk_yields_the_tree_in_path_order_one_folder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        // "a.b" sorts before "a/…" bytewise ('.' < '/') but after "a" in
        // path order: a folder's entries come right after it.
        let t = tree_with(
            dir.path(),
            &["a.b", "a/z", "a/c/d", "a-x/1", "b", "tmp/skip/x"],
        );
        let excludes = Excludes::new(&["tmp".to_string()]).unwrap();
        let mut index = Index::in_memory();
        let mut walk = Walk::new(&mut index, Rehash::Changed, true);
        let mut got = Vec::new();
        while let Some(e) = walk.next(&t, &mut index, &excludes).unwrap() {
            // Only the folders on the current path (and their entries not
            // yet yielded) are held.
            assert!(walk.stack.len() <= 3, "{:?}", walk.stack);
            got.push(e);
        }
        assert_eq!(
            names(&got),
            ["a", "a/c", "a/c/d", "a/z", "a-x", "a-x/1", "a.b", "b"]
        );
        let mut sorted = got.clone();
        sorted.sort_by(|x, y| crate::model::path_order(&x.0, &y.0));
        assert_eq!(names(&sorted), names(&got));
        // Hashed (the manifest's walk) and recorded in the index.
        let b = got.iter().find(|e| e.0 == Path::new("b")).unwrap();
        assert_eq!(b.2, Some(super::super::index::hash_bytes(b"b")));
        assert!(index.get(Path::new("a/c/d")).is_some());
        // The same as a scan collected whole.
        let scan = index.scan(&t, &excludes, Rehash::Changed, true).unwrap();
        assert_eq!(scan.entries.collect::<Vec<_>>(), got);
    }

    #[test]
    fn a_finished_walk_forgets_what_it_did_not_find_but_not_what_was_set_meanwhile() {
        let (dir, t, excludes, mut index) = fixture(&["a/1", "b/2"]);
        index.scan(&t, &excludes, Rehash::Changed, true).unwrap();
        assert_eq!(index.len(), 4);
        std::fs::remove_file(dir.path().join("a/1")).unwrap();
        let mut walk = Walk::new(&mut index, Rehash::Changed, true);
        // Past "a" (listed without "1"), then "b/new" is set by someone
        // else (an acknowledgement, say) before the walk gets there.
        assert_eq!(
            walk.next(&t, &mut index, &excludes).unwrap().unwrap().0,
            Path::new("a")
        );
        let st = t.lstat(Path::new("b/2")).unwrap().unwrap();
        index.set("b/new".into(), Entry::new(&st, 7, true));
        while walk.next(&t, &mut index, &excludes).unwrap().is_some() {}
        let mut left: Vec<_> = index.iter().map(|(p, _)| p.display().to_string()).collect();
        left.sort();
        assert_eq!(left, ["a", "b", "b/2", "b/new"]);
        // A walk superseded by a later one forgets nothing when it ends.
        let mut first = Walk::new(&mut index, Rehash::Changed, true);
        let mut second = Walk::new(&mut index, Rehash::Changed, true);
        while first.next(&t, &mut index, &excludes).unwrap().is_some() {}
        assert!(index.get(Path::new("b/new")).is_some());
        while second.next(&t, &mut index, &excludes).unwrap().is_some() {}
        assert!(index.get(Path::new("b/new")).is_none());
    }

    /// A folder renamed away while a walk that is held runs: the first
    /// comparison from that walk knows it, as it would walking, and
    /// compares again.
    #[test]
    fn a_held_scan_says_what_vanished_while_it_was_taken() {
        let (dir, t, excludes, mut index) = fixture(&["0", "a/new/m1", "b/1"]);
        let mut moved = false;
        let held = Walk::new(&mut index, Rehash::Changed, true)
            .run(&t, &mut index, &excludes, 1 << 20, |e| {
                if !moved && e.0 == Path::new("0") {
                    std::fs::rename(dir.path().join("a"), dir.path().join("c")).unwrap();
                    moved = true;
                }
            })
            .unwrap()
            .expect("held");
        assert!(moved);
        assert_eq!(Ordered::held(held).vanished(), 1);
    }

    #[test]
    fn a_folder_renamed_away_before_the_walk_enters_it_is_counted_vanished() {
        let (dir, t, excludes, mut index) = fixture(&["0", "a/new/m1", "b/1"]);
        let mut walk = Walk::new(&mut index, Rehash::Changed, true);
        // The root is listed; "a" is not entered yet.
        let first = walk.next(&t, &mut index, &excludes).unwrap().unwrap();
        assert_eq!(first.0, Path::new("0"));
        // Renamed away, and a new "a" made in its place (an IMAP RENAME,
        // then a CREATE of the old name); "b" removed.
        std::fs::rename(dir.path().join("a"), dir.path().join("c")).unwrap();
        std::fs::create_dir_all(dir.path().join("a/cur")).unwrap();
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        let mut rest = Vec::new();
        while let Some(e) = walk.next(&t, &mut index, &excludes).unwrap() {
            rest.push(e);
        }
        // What is at "a" now is what the walk yields; "c" (listed after
        // the walk passed the root) and the old "a"'s message are not.
        assert_eq!(names(&rest), ["a", "a/cur", "b"]);
        assert_eq!(walk.vanished, 2, "the replaced \"a\" and the removed \"b\"");
        // A walk of the tree as it stands finds nothing vanished.
        let mut again = Walk::new(&mut index, Rehash::Changed, true);
        while again.next(&t, &mut index, &excludes).unwrap().is_some() {}
        assert_eq!(again.vanished, 0);
    }

    #[test]
    fn a_scan_of_a_store_larger_than_the_index_knows_is_held_only_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..HELD_UNSIZED_ENTRIES_MAX - 63)
            .map(|i| format!("{:02}/{i}", i % 64))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = tree_with(dir.path(), &refs[..HELD_UNSIZED_ENTRIES_MAX - 64]);
        let excludes = Excludes::new(&[]).unwrap();
        let mut index = Index::in_memory();
        let mut seen = 0;
        let held = Walk::new(&mut index, Rehash::Changed, false)
            .run(&t, &mut index, &excludes, usize::MAX, |_| seen += 1)
            .unwrap();
        // The folders and their files: the unsized budget exactly.
        assert_eq!(
            (seen, held.map(|s| s.entries.len())),
            (HELD_UNSIZED_ENTRIES_MAX, Some(HELD_UNSIZED_ENTRIES_MAX))
        );
        // One more than the index knows and the unsized budget: every
        // entry seen, none held.
        let t = tree_with(dir.path(), &refs[HELD_UNSIZED_ENTRIES_MAX - 64..][..1]);
        let mut index = Index::in_memory();
        let held = Walk::new(&mut index, Rehash::Changed, false)
            .run(&t, &mut index, &excludes, usize::MAX, |_| seen += 1)
            .unwrap();
        assert_eq!(
            (seen, held.is_none()),
            (2 * HELD_UNSIZED_ENTRIES_MAX + 1, true)
        );
    }
}
