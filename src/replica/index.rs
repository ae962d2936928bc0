//! Per-store index of the local tree: each path's content hash (a cache, so
//! unchanged files are not re-hashed) and whether the peer is known to hold
//! exactly this version (`synced`, the common base used to decide conflicts).
//!
//! Losing the index costs only work and caution: every file is re-hashed,
//! and files that differ from the peer are kept aside rather than replaced.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, StatxFlags};
use serde::{Deserialize, Serialize};
use tracing::warn;

mod base;

use base::{key_of, key_under, path_of, Base, Change, Out, Written, BLOCK, NONE};

use crate::wire::sync::{EntryKind, ManifestEntry, Meta};

use super::Excludes;

#[cfg(test)]
impl Version {
    /// A fixed version of inode `ino`, for tests.
    pub(crate) fn sample(ino: u64) -> Version {
        Version {
            size: 10,
            mtime_s: 1,
            mtime_ns: 2,
            ino,
            ctime_s: 3,
            ctime_ns: 4,
        }
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub ino: u64,
    pub ctime_s: i64,
    pub ctime_ns: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn wire(self) -> EntryKind {
        match self {
            Kind::File => EntryKind::File,
            Kind::Dir => EntryKind::Dir,
            Kind::Symlink => EntryKind::Symlink,
        }
    }
}

/// Result of an lstat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub version: Version,
    pub meta: Meta,
    pub nlink: u32,
    pub dev: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub version: Version,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// xxh3-128 of the content (files) or target (symlinks); hex on disk
    /// (JSON has no u128), 16 bytes in memory.
    #[serde(with = "hex128")]
    hash: [u64; 2],
    pub synced: bool,
    /// The last walk that found (or anything that set or moved) this
    /// entry ([`Index::begin_walk`]); in the padding, never saved.
    #[serde(skip)]
    mark: u8,
}

/// Equal as what is known of the file (the walk's mark is bookkeeping).
impl PartialEq for Entry {
    fn eq(&self, o: &Entry) -> bool {
        self.kind == o.kind
            && self.version == o.version
            && self.mode == o.mode
            && self.uid == o.uid
            && self.gid == o.gid
            && self.hash == o.hash
            && self.synced == o.synced
    }
}

impl Eq for Entry {}

/// An u128 as 32 hex digits in the index file.
mod hex128 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u64; 2], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", super::join128(*v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u64; 2], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        u128::from_str_radix(&text, 16)
            .map(super::split128)
            .map_err(|e| D::Error::custom(format!("hash {text:?} is not 32 hex digits: {e}")))
    }
}

/// A u128 as two u64 (8-byte alignment keeps an index entry at 72 bytes
/// instead of 96: it is held once per tracked file).
fn split128(v: u128) -> [u64; 2] {
    [(v >> 64) as u64, v as u64]
}

fn join128(v: [u64; 2]) -> u128 {
    (u128::from(v[0]) << 64) | u128::from(v[1])
}

impl Entry {
    pub fn new(st: &Stat, hash: u128, synced: bool) -> Entry {
        Entry {
            kind: st.kind,
            version: st.version,
            mode: st.meta.mode,
            uid: st.meta.uid,
            gid: st.meta.gid,
            hash: split128(hash),
            synced,
            mark: 0,
        }
    }

    pub fn hash(&self) -> u128 {
        join128(self.hash)
    }

    pub fn meta(&self) -> Meta {
        Meta {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime_sec: self.version.mtime_s,
            mtime_nsec: self.version.mtime_ns,
        }
    }
}

/// The same for an open file (no path walk).
pub fn fstat(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<Stat>> {
    stat_of(rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::BASIC_STATS,
    ))
}

pub(crate) fn stat_of(r: rustix::io::Result<rustix::fs::Statx>) -> std::io::Result<Option<Stat>> {
    match r {
        Ok(x) => {
            let fmt = u32::from(x.stx_mode) & 0o170000;
            let kind = match fmt {
                0o040000 => Kind::Dir,
                0o120000 => Kind::Symlink,
                0o100000 => Kind::File,
                // Sockets, fifos and devices have no place in a mailstore.
                _ => return Ok(None),
            };
            Ok(Some(Stat {
                kind,
                version: Version {
                    size: x.stx_size,
                    mtime_s: x.stx_mtime.tv_sec,
                    mtime_ns: x.stx_mtime.tv_nsec,
                    ino: x.stx_ino,
                    ctime_s: x.stx_ctime.tv_sec,
                    ctime_ns: x.stx_ctime.tv_nsec,
                },
                meta: Meta {
                    mode: u32::from(x.stx_mode) & 0o7777,
                    uid: x.stx_uid,
                    gid: x.stx_gid,
                    mtime_sec: x.stx_mtime.tv_sec,
                    mtime_nsec: x.stx_mtime.tv_nsec,
                },
                nlink: x.stx_nlink,
                dev: (u64::from(x.stx_dev_major) << 32) | u64::from(x.stx_dev_minor),
            }))
        }
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn hash_bytes(b: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(b)
}

/// Changes an index holds before it writes a new base: about 10 MiB.
pub const CHANGES_MAX: usize = 65_536;
/// The same for a store kept in memory (the simulator merges often).
const CHANGES_MAX_IN_MEMORY: usize = 48;

/// The index of one store: the entries of its last save, read from the
/// index file a block at a time ([`base`]), and the changes since, in
/// memory. Once [`CHANGES_MAX`] changes are held, they are frozen and a
/// thread of its own merges them into a new file while new changes
/// gather in front of them; a million-file store keeps one key per 64
/// entries in memory, not the million.
#[derive(Debug)]
pub struct Index {
    base: Base,
    /// Base entries the current walk found: one bit per ordinal.
    marks: Vec<u64>,
    /// Changes a background write is merging into a new base (sorted by
    /// key), read as a layer between the base and `over` until it is done.
    frozen: Arc<Vec<Change>>,
    /// Frozen changes the current walk found: one bit each.
    frozen_marks: Vec<u64>,
    /// Changes since, by key ([`base::key_of`]: path order); `None`: gone.
    over: BTreeMap<Box<[u8]>, Option<Entry>>,
    /// Empty: kept in memory.
    file: PathBuf,
    /// To be written even with no change (migrated; a failed write).
    force: bool,
    /// The mark of the latest walk ([`Index::begin_walk`]).
    walk_mark: u8,
    saving: Option<std::thread::JoinHandle<std::io::Result<Written>>>,
    /// When a write last failed: changes do not start another for
    /// [`RETRY_AFTER`] (a full disk is not rewritten at every change).
    failed_at: Option<std::time::Instant>,
    changes_max: usize,
}

/// How long after a failed write changes wait to start another.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The index file of an older release (JSON, UTF-8 names only): read once
/// to migrate, then replaced by the binary file.
#[derive(Deserialize)]
struct OnDisk {
    version: u32,
    entries: Vec<(PathBuf, Entry)>,
}

/// Why an index file could not be read; names the file and where.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {file}: {problem} (at byte {offset}, entry {entry})")]
    Corrupt {
        file: PathBuf,
        offset: usize,
        entry: u64,
        problem: String,
    },
    #[error("index {file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// Checks an index file's bytes as [`Index::load`] reads them: how many
/// entries it holds, or the error naming `file` and where. For tools and
/// fuzzing.
pub fn check_bytes(file: &Path, bytes: &[u8]) -> Result<usize, IndexError> {
    Base::from_bytes(file, bytes.into()).map(|b| b.count() as usize)
}

/// The checksum that seals an index file (xxh3-64 of everything before
/// it). For tools and fuzzing.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn words(count: u64) -> usize {
    (count as usize).div_ceil(BLOCK)
}

fn bit(marks: &[u64], i: u64) -> bool {
    marks
        .get((i / 64) as usize)
        .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
}

fn set_bit(marks: &mut [u64], i: u64) {
    if let Some(w) = marks.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

/// Where a key's entry is.
enum At<'a> {
    Over(Option<&'a Entry>),
    Frozen(usize, Option<&'a Entry>),
    Base(u64, Entry),
    Nowhere,
}

/// Two streams of `(key, entry or gone)` in key order as one, `a` winning
/// on equal keys.
fn layered<'a>(
    a: impl Iterator<Item = (Box<[u8]>, Option<Entry>)> + 'a,
    b: impl Iterator<Item = (Box<[u8]>, Option<Entry>)> + 'a,
) -> impl Iterator<Item = (Box<[u8]>, Option<Entry>)> + 'a {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((ka, _)), Some((kb, _))) => {
                if ka == kb {
                    b.next();
                    true
                } else {
                    ka < kb
                }
            }
        };
        if take_a {
            a.next()
        } else {
            b.next()
        }
    })
}

impl Index {
    /// Whether `<state_dir>` holds an index of `store` (this node walked
    /// it before: a restart, not a first start).
    pub fn exists(state_dir: &Path, store: &str) -> bool {
        ["bin", "json"]
            .iter()
            .any(|ext| state_dir.join(format!("index-{store}.{ext}")).exists())
    }

    /// Loads `<state_dir>/index-<store>.bin` (or migrates an older
    /// `index-<store>.json`). A missing index starts empty; an unreadable
    /// one starts empty and says why, which is safe: files are re-hashed
    /// and conflicts kept aside.
    pub fn load(state_dir: &Path, store: &str) -> Index {
        let file = state_dir.join(format!("index-{store}.bin"));
        let legacy = state_dir.join(format!("index-{store}.json"));
        let mut ix = Index::new(file.clone(), Base::empty(), CHANGES_MAX);
        match Base::open(&file) {
            Ok(b) => ix.set_base(b),
            Err(IndexError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                if let Ok(b) = std::fs::read(&legacy) {
                    match serde_json::from_slice::<OnDisk>(&b) {
                        Ok(d) if d.version == 1 => {
                            for (p, e) in d.entries {
                                ix.over.insert(key_of(&p), Some(e));
                            }
                            // Rewritten in the binary format at the next save.
                            ix.force = true;
                        }
                        Ok(d) => {
                            warn!(file = %legacy.display(), "index version {} unknown; starting empty", d.version);
                        }
                        Err(e) => {
                            warn!(file = %legacy.display(), "index unreadable ({e}); starting empty: files will be re-hashed and conflicts kept aside");
                        }
                    }
                }
            }
            Err(e) => {
                warn!("{e}; starting empty: files will be re-hashed and conflicts kept aside")
            }
        }
        ix
    }

    fn new(file: PathBuf, base: Base, changes_max: usize) -> Index {
        let mut ix = Index {
            base: Base::empty(),
            marks: Vec::new(),
            frozen: Arc::new(Vec::new()),
            frozen_marks: Vec::new(),
            over: BTreeMap::new(),
            file,
            force: false,
            walk_mark: 0,
            saving: None,
            failed_at: None,
            changes_max,
        };
        ix.set_base(base);
        ix
    }

    fn set_base(&mut self, base: Base) {
        self.marks = vec![0; words(base.count())];
        self.base = base;
    }

    /// An index kept in memory only (a simulated store): never saved to
    /// a file; its changes are merged into a base in memory as often as a
    /// file-backed index's would be at scale.
    pub fn in_memory() -> Index {
        Index::new(PathBuf::new(), Base::empty(), CHANGES_MAX_IN_MEMORY)
    }

    /// What a save now and a load would give (the simulator's saved
    /// index): the same entries, in memory, no walk under way.
    pub fn saved_copy(&self) -> Index {
        let w = base::merge(&self.base, &self.changes(), Out::Bytes)
            .expect("a merge into memory cannot fail");
        Index::new(PathBuf::new(), w.base, self.changes_max)
    }

    pub fn mark_dirty(&mut self) {
        self.force = true;
    }

    pub fn is_dirty(&self) -> bool {
        self.force || !self.over.is_empty() || !self.frozen.is_empty()
    }

    fn put(&mut self, k: Box<[u8]>, entry: Option<Entry>) {
        self.over.insert(k, entry);
    }

    fn at(&self, k: &[u8]) -> At<'_> {
        if let Some(e) = self.over.get(k) {
            return At::Over(e.as_ref());
        }
        if let Ok(i) = self.frozen.binary_search_by(|(f, _)| (**f).cmp(k)) {
            return At::Frozen(i, self.frozen[i].1.as_ref());
        }
        match self.base.find(k) {
            Some((o, e)) => At::Base(o, e),
            None => At::Nowhere,
        }
    }

    fn get_key(&self, k: &[u8]) -> Option<Entry> {
        match self.at(k) {
            At::Over(e) | At::Frozen(_, e) => e.cloned(),
            At::Base(_, e) => Some(e),
            At::Nowhere => None,
        }
    }

    /// Every key from `from` on, in path order, with its entry (`None`:
    /// gone) and the current walk's mark.
    fn layers_from<'a>(
        &'a self,
        from: &[u8],
    ) -> impl Iterator<Item = (Box<[u8]>, Option<Entry>)> + 'a {
        let mark = self.walk_mark;
        let base = self.base.range_from(from).map(move |(o, k, mut e)| {
            e.mark = if bit(&self.marks, o) { mark } else { 0 };
            (k, Some(e))
        });
        let start = self.frozen.partition_point(|(k, _)| **k < *from);
        let frozen = self.frozen[start..]
            .iter()
            .enumerate()
            .map(move |(i, (k, e))| {
                let e = e.clone().map(|mut e| {
                    e.mark = if bit(&self.frozen_marks, (start + i) as u64) {
                        mark
                    } else {
                        0
                    };
                    e
                });
                (k.clone(), e)
            });
        let over = self
            .over
            .range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .map(|(k, e)| (k.clone(), e.clone()));
        layered(over, layered(frozen, base))
    }

    /// Every entry from key `from` on, in path order, changes applied
    /// (each carrying the current walk's mark).
    fn merged_from<'a>(&'a self, from: &[u8]) -> impl Iterator<Item = (Box<[u8]>, Entry)> + 'a {
        self.layers_from(from).filter_map(|(k, e)| Some((k, e?)))
    }

    /// `k` and every entry below it.
    fn under(&self, k: &[u8]) -> Vec<(Box<[u8]>, Entry)> {
        self.merged_from(k)
            .take_while(|(p, _)| key_under(p, k))
            .collect()
    }

    /// Every entry, in path order (a walk of the index file: for what is
    /// rare, such as a takeover's completion).
    pub fn iter(&self) -> impl Iterator<Item = (PathBuf, Entry)> + '_ {
        self.merged_from(&[]).map(|(k, e)| (path_of(&k), e))
    }

    /// The entries `keep` takes, in path order (one read of the index
    /// file; only what is kept is decoded whole).
    pub fn select(&self, mut keep: impl FnMut(&Entry) -> bool) -> Vec<(PathBuf, Entry)> {
        let mark = self.walk_mark;
        let from_base = self
            .base
            .select(&mut keep)
            .into_iter()
            .map(|(o, k, mut e)| {
                e.mark = if bit(&self.marks, o) { mark } else { 0 };
                (k, Some(e))
            });
        let from_frozen = self
            .frozen
            .iter()
            .filter(|(_, e)| e.as_ref().is_none_or(&mut keep))
            .cloned()
            .collect::<Vec<_>>();
        let from_over = self
            .over
            .iter()
            .filter(|(_, e)| e.as_ref().is_none_or(&mut keep))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect::<Vec<_>>();
        // A change that is not kept still hides the base's entry.
        let hidden = |k: &[u8]| {
            self.over.contains_key(k) || self.frozen.binary_search_by(|(f, _)| (**f).cmp(k)).is_ok()
        };
        let from_base: Vec<_> = from_base.filter(|(k, _)| !hidden(k)).collect();
        let from_frozen: Vec<_> = from_frozen
            .into_iter()
            .filter(|(k, _)| !self.over.contains_key(k))
            .collect();
        layered(
            from_over.into_iter(),
            layered(from_frozen.into_iter(), from_base.into_iter()),
        )
        .filter_map(|(k, e)| Some((path_of(&k), e?)))
        .collect()
    }

    /// How many entries (counted: a walk of the index).
    pub fn len(&self) -> usize {
        self.merged_from(&[]).count()
    }

    pub fn is_empty(&self) -> bool {
        self.merged_from(&[]).next().is_none()
    }

    /// About how many entries, at once (for sizing).
    pub fn len_hint(&self) -> usize {
        self.base.count() as usize + self.frozen.len() + self.over.len()
    }

    /// Every change since the base (frozen and newer), in key order.
    fn changes(&self) -> Vec<Change> {
        let over = self.over.iter().map(|(k, e)| (k.clone(), e.clone()));
        layered(over, self.frozen.iter().cloned()).collect()
    }

    /// Freezes the changes for a write (none may be frozen already).
    fn freeze(&mut self) -> Arc<Vec<Change>> {
        debug_assert!(self.frozen.is_empty());
        let mark = self.walk_mark;
        let over = std::mem::take(&mut self.over);
        let mut marks = vec![0; over.len().div_ceil(64)];
        let frozen: Vec<Change> = over
            .into_iter()
            .enumerate()
            .map(|(i, (k, e))| {
                if e.as_ref().is_some_and(|e| e.mark == mark) {
                    set_bit(&mut marks, i as u64);
                }
                (k, e)
            })
            .collect();
        self.frozen = Arc::new(frozen);
        self.frozen_marks = marks;
        self.frozen.clone()
    }

    /// A write of the frozen changes failed: they go back in front of the
    /// base, behind what changed since.
    fn thaw(&mut self) {
        let frozen = std::mem::take(&mut self.frozen);
        let marks = std::mem::take(&mut self.frozen_marks);
        for (i, (k, e)) in frozen.iter().enumerate() {
            if !self.over.contains_key(k) {
                let e = e.clone().map(|mut e| {
                    e.mark = if bit(&marks, i as u64) {
                        self.walk_mark
                    } else {
                        0
                    };
                    e
                });
                self.over.insert(k.clone(), e);
            }
        }
        self.force = true;
        self.failed_at = Some(std::time::Instant::now());
    }

    /// Writes the index durably if it changed (waiting for a background
    /// write first).
    pub fn save(&mut self) -> std::io::Result<()> {
        self.finish_save();
        if !self.is_dirty() {
            return Ok(());
        }
        let changes = self.freeze();
        let out = if self.file.as_os_str().is_empty() {
            Out::Bytes
        } else {
            Out::File(&self.file)
        };
        match base::merge(&self.base, &changes, out) {
            Ok(w) => {
                drop(changes);
                self.adopt(w);
                self.force = false;
                Ok(())
            }
            Err(e) => {
                drop(changes);
                self.thaw();
                Err(e)
            }
        }
    }

    /// Starts writing the changes into a new index file on a thread of its
    /// own (the loop must not stop for a merge and an fsync); nothing if
    /// one is under way or nothing changed. [`Index::finish_save`] or a
    /// later change takes its result.
    pub fn save_in_background(&mut self) {
        self.poll_save();
        if self.saving.is_some() || !self.is_dirty() {
            return;
        }
        if self.file.as_os_str().is_empty() {
            if let Err(e) = self.save() {
                warn!("cannot merge an index kept in memory: {e}");
            }
            return;
        }
        let (base, file) = (self.base.clone(), self.file.clone());
        let changes = self.freeze();
        self.force = false;
        let spawned = std::thread::Builder::new()
            .name("hasync-index".into())
            .spawn(move || base::merge(&base, &changes, Out::File(&file)));
        match spawned {
            Ok(h) => self.saving = Some(h),
            Err(e) => {
                warn!("cannot start the index writer thread: {e}; saving here");
                self.thaw();
                if let Err(e) = self.save() {
                    warn!(file = %self.file.display(), "cannot save index: {e}");
                }
            }
        }
    }

    /// Is a background write under way?
    pub fn is_saving(&self) -> bool {
        self.saving.is_some()
    }

    /// Takes a finished background write, if any.
    pub fn poll_save(&mut self) {
        if self.saving.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish_save();
        }
    }

    /// Waits for a background write (if any) and takes its result: the new
    /// base, or, if it failed, the changes stay to be written again.
    pub fn finish_save(&mut self) {
        let Some(h) = self.saving.take() else {
            return;
        };
        match h.join() {
            Ok(Ok(w)) => self.adopt(w),
            Ok(Err(e)) => {
                warn!(file = %self.file.display(), "cannot save index: {e}; its changes stay in memory and are written again");
                self.thaw();
            }
            Err(_) => {
                warn!(file = %self.file.display(), "the index writer panicked; its changes stay in memory");
                self.thaw();
            }
        }
    }

    /// Makes a merge's file the base in place of the old base and the
    /// frozen changes; the walk's marks follow the entries.
    fn adopt(&mut self, w: Written) {
        if w.from != self.base.id {
            // Written from a base since replaced (cannot happen: writes
            // are one at a time): the frozen changes stay.
            self.thaw();
            return;
        }
        let mut marks = vec![0; words(w.base.count())];
        for (o, &n) in w.old_to_new.iter().enumerate() {
            if n != NONE && bit(&self.marks, o as u64) {
                set_bit(&mut marks, u64::from(n));
            }
        }
        for (i, &n) in w.placed.iter().enumerate() {
            if n != NONE && bit(&self.frozen_marks, i as u64) {
                set_bit(&mut marks, u64::from(n));
            }
        }
        self.base = w.base;
        self.marks = marks;
        self.frozen = Arc::new(Vec::new());
        self.frozen_marks = Vec::new();
        self.failed_at = None;
        if !self.file.as_os_str().is_empty() {
            // Migrated: the older JSON file must not be read again.
            let _ = std::fs::remove_file(self.file.with_extension("json"));
        }
    }

    /// After a change: writes a new base once enough changes are held.
    fn tick(&mut self) {
        if self.over.len() > self.changes_max
            && self.failed_at.is_none_or(|t| t.elapsed() >= RETRY_AFTER)
        {
            self.save_in_background();
        } else {
            self.poll_save();
        }
    }

    /// Is the file at `rel` (now `st`) exactly the version the peer holds?
    pub fn unchanged_and_synced(&self, rel: &Path, st: &Stat) -> bool {
        self.get(rel)
            .is_some_and(|e| e.synced && e.kind == st.kind && same_version(&e.version, &st.version))
    }

    pub fn set(&mut self, rel: PathBuf, mut entry: Entry) {
        // Known now: a walk under way does not forget it.
        entry.mark = self.walk_mark;
        self.put(key_of(&rel), Some(entry));
        self.tick();
    }

    /// Starts a walk ([`super::walk::Walk`]): returns its mark. What the
    /// walk visits, and what is set or moved while it runs, gets the mark;
    /// [`Index::end_walk`] forgets the rest. A later walk supersedes an
    /// earlier one still under way (that one then forgets nothing).
    pub fn begin_walk(&mut self) -> u8 {
        // No entry keeps an earlier walk's mark.
        self.marks.fill(0);
        self.frozen_marks.fill(0);
        for e in self.over.values_mut().flatten() {
            e.mark = 0;
        }
        self.walk_mark = self.walk_mark.checked_add(1).unwrap_or(1);
        self.walk_mark
    }

    /// The entry at `rel`, marked as found by the walk `mark` (unless a
    /// later walk began: its marks are not overwritten).
    pub fn visit(&mut self, rel: &Path, mark: u8) -> Option<Entry> {
        let current = mark == self.walk_mark;
        let k = key_of(rel);
        if let Some(e) = self.over.get_mut(&k) {
            let e = e.as_mut()?;
            if current {
                e.mark = mark;
            }
            return Some(e.clone());
        }
        let (i, e) = match self.at(&k) {
            At::Frozen(i, e) => (Ok(i), e?.clone()),
            At::Base(o, e) => (Err(o), e),
            _ => return None,
        };
        if current {
            match i {
                Ok(i) => set_bit(&mut self.frozen_marks, i as u64),
                Err(o) => set_bit(&mut self.marks, o),
            }
        }
        Some(e)
    }

    /// The walk `mark` has found everything: forgets what it did not find
    /// (gone from the store), unless a later walk began meanwhile.
    pub fn end_walk(&mut self, mark: u8) {
        if mark != self.walk_mark {
            return;
        }
        // Changes found or not: only `over` can hide a frozen change.
        let mut gone: Vec<Box<[u8]>> = self
            .over
            .iter()
            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.mark != mark))
            .map(|(k, _)| k.clone())
            .collect();
        for (i, (k, e)) in self.frozen.iter().enumerate() {
            if e.is_some() && !bit(&self.frozen_marks, i as u64) && !self.over.contains_key(k) {
                gone.push(k.clone());
            }
        }
        // Base entries not found, unless a change hides them.
        let count = self.base.count();
        for (w, &word) in self.marks.iter().enumerate() {
            let n = (count - (w * BLOCK) as u64).min(BLOCK as u64);
            let full = if n == 64 { u64::MAX } else { (1 << n) - 1 };
            if word & full == full {
                continue;
            }
            for i in 0..n {
                if (word >> i) & 1 == 1 {
                    continue;
                }
                let Some(k) = self.base.key_at((w * BLOCK) as u64 + i) else {
                    continue;
                };
                let hidden = self.over.contains_key(&k)
                    || self.frozen.binary_search_by(|(f, _)| (**f).cmp(&k)).is_ok();
                if !hidden {
                    gone.push(k);
                }
            }
        }
        for k in gone {
            self.put(k, None);
        }
        self.tick();
    }

    pub fn get(&self, rel: &Path) -> Option<Entry> {
        self.get_key(&key_of(rel))
    }

    /// Says whether the peer holds the entry at `rel` (if the index has
    /// one); a change only if it differs (a comparison says it of every
    /// entry, and the entries must stay in the file).
    pub fn set_synced(&mut self, rel: &Path, synced: bool) {
        let k = key_of(rel);
        let changed = match self.at(&k) {
            At::Over(_) => {
                if let Some(Some(e)) = self.over.get_mut(&k) {
                    e.synced = synced;
                }
                return;
            }
            At::Frozen(i, Some(e)) if e.synced != synced => {
                let mut e = e.clone();
                e.synced = synced;
                e.mark = if bit(&self.frozen_marks, i as u64) {
                    self.walk_mark
                } else {
                    0
                };
                e
            }
            At::Base(o, mut e) if e.synced != synced => {
                e.synced = synced;
                e.mark = if bit(&self.marks, o) {
                    self.walk_mark
                } else {
                    0
                };
                e
            }
            _ => return,
        };
        self.put(k, Some(changed));
        self.tick();
    }

    /// Forgets `rel` and everything under it. A file is one lookup; only a
    /// directory (or an unknown path) reads the index around it.
    pub fn remove_tree(&mut self, rel: &Path) {
        self.forget(key_of(rel));
        self.tick();
    }

    fn forget(&mut self, k: Box<[u8]>) {
        if self.get_key(&k).is_some_and(|e| e.kind != Kind::Dir) {
            self.put(k, None);
        } else {
            for (p, _) in self.under(&k) {
                self.put(p, None);
            }
        }
    }

    /// Marks `rel` and the folders below it as not held by the replica
    /// (each is listed again when sent); files keep what is known of them.
    pub fn unsync_folders(&mut self, rel: &Path) {
        self.unsync_below(rel, true);
    }

    /// Marks `rel` and everything under it as not held by the replica.
    pub fn unsync_tree(&mut self, rel: &Path) {
        self.unsync_below(rel, false);
    }

    fn unsync_below(&mut self, rel: &Path, folders_only: bool) {
        let k = key_of(rel);
        let todo: Vec<(Box<[u8]>, Entry)> = match self.get_key(&k) {
            Some(e) if e.kind != Kind::Dir => {
                self.set_synced(rel, false);
                return;
            }
            _ => self.under(&k),
        };
        for (p, mut e) in todo {
            if e.synced && (p == k || !folders_only || e.kind == Kind::Dir) {
                e.synced = false;
                self.put(p, Some(e));
            }
        }
        self.tick();
    }

    /// Moves `from` (and everything under it) to `to`. Renaming a file
    /// (a Maildir flag change) costs a few lookups, not a walk of the index.
    pub fn rename_tree(&mut self, from: &Path, to: &Path) {
        let (fk, tk) = (key_of(from), key_of(to));
        let moved_entry = |mut e: Entry, mark| {
            // A rename changes ctime; match on the rest of the version.
            e.version.ctime_s = 0;
            e.version.ctime_ns = 0;
            e.mark = mark;
            e
        };
        let from_entry = self.get_key(&fk);
        if from_entry.as_ref().is_some_and(|e| e.kind != Kind::Dir)
            && !self.get_key(&tk).is_some_and(|e| e.kind == Kind::Dir)
        {
            let e = moved_entry(from_entry.expect("checked"), self.walk_mark);
            self.put(fk, None);
            self.put(tk, Some(e));
            self.tick();
            return;
        }
        let moved = self.under(&fk);
        self.forget(tk.clone());
        for (p, _) in &moved {
            self.put(p.clone(), None);
        }
        for (p, e) in moved {
            let mut nk = tk.to_vec();
            nk.extend_from_slice(&p[fk.len()..]);
            let e = moved_entry(e, self.walk_mark);
            self.put(nk.into(), Some(e));
        }
        self.tick();
    }

    /// Walks the store and returns every entry (sorted by path) with its
    /// hash, re-hashing only what changed since it was last seen (or
    /// everything, with `full_verify`): a [`Walk`](super::walk::Walk)
    /// collected whole. Callers that can take the entries one at a time
    /// walk instead (the memory of a folder, not of the tree).
    ///
    /// With `hash_uncached == false`, a path whose hash is not cached gets
    /// `None` instead of being read: the caller hashes only the paths it
    /// needs to compare (an initial sync to an empty replica reads nothing
    /// twice).
    ///
    /// Paths past [`super::tree::REL_PATH_BYTES_MAX`] are not entered;
    /// they come back in [`Scan::too_long`].
    pub fn scan<T: super::tree::LocalTree + ?Sized>(
        &mut self,
        tree: &T,
        excludes: &Excludes,
        rehash: Rehash,
        hash_uncached: bool,
    ) -> std::io::Result<Scan> {
        super::walk::Walk::new(self, rehash, hash_uncached).collect(tree, self, excludes)
    }
}

impl Drop for Index {
    /// A background write under way is finished (its file is whole either
    /// way; this keeps a stop from leaving its thread behind).
    fn drop(&mut self) {
        self.finish_save();
    }
}

/// One entry a scan found: its path, what it is, its hash when known.
pub type ScanEntry = (PathBuf, Stat, Option<u128>);

/// A scan's entries held for a later comparison, packed: about a fifth of
/// what they take unpacked (see [`super::packed`]).
pub type ScanEntries = super::packed::Packed<ScanEntry>;

/// Flag bits of a packed [`ScanEntry`], after its kind (two bits).
const PACKED_HASHED: u8 = 1 << 2;
/// The metadata's mtime is the version's (as a scan's `statx` gives them).
const PACKED_SAME_MTIME: u8 = 1 << 3;

impl super::packed::Record for ScanEntry {
    fn path(&self) -> &[u8] {
        self.0.as_os_str().as_bytes()
    }

    fn put_fields(&self, out: &mut Vec<u8>) {
        use super::packed::{put_int, put_uint};
        let (_, st, hash) = self;
        let v = &st.version;
        let same = st.meta.mtime_sec == v.mtime_s && st.meta.mtime_nsec == v.mtime_ns;
        let kind = match st.kind {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
        };
        out.push(
            kind | if hash.is_some() { PACKED_HASHED } else { 0 }
                | if same { PACKED_SAME_MTIME } else { 0 },
        );
        put_uint(out, v.size);
        put_int(out, v.mtime_s);
        put_uint(out, v.mtime_ns.into());
        put_uint(out, v.ino);
        // The change time as its distance from the modification time: a
        // file's are the same, or apart by a rename's few microseconds.
        put_int(out, v.ctime_s.wrapping_sub(v.mtime_s));
        put_int(out, i64::from(v.ctime_ns) - i64::from(v.mtime_ns));
        put_uint(out, st.meta.mode.into());
        put_uint(out, st.meta.uid.into());
        put_uint(out, st.meta.gid.into());
        if !same {
            put_int(out, st.meta.mtime_sec);
            put_uint(out, st.meta.mtime_nsec.into());
        }
        put_uint(out, st.nlink.into());
        put_uint(out, st.dev);
        if let Some(h) = hash {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }

    fn unpack(path: &[u8], b: &[u8], at: &mut usize) -> Self {
        use super::packed::{get_int, get_uint};
        // Written by `put_fields` in this process: the numbers fit.
        let small = |v: u64| u32::try_from(v).expect("a packed 32-bit field");
        let flags = b[*at];
        *at += 1;
        let kind = match flags & 3 {
            0 => Kind::File,
            1 => Kind::Dir,
            _ => Kind::Symlink,
        };
        let size = get_uint(b, at);
        let mtime_s = get_int(b, at);
        let mtime_ns = small(get_uint(b, at));
        let ino = get_uint(b, at);
        let ctime_s = mtime_s.wrapping_add(get_int(b, at));
        let ctime_ns =
            u32::try_from(i64::from(mtime_ns) + get_int(b, at)).expect("a packed 32-bit field");
        let version = Version {
            size,
            mtime_s,
            mtime_ns,
            ino,
            ctime_s,
            ctime_ns,
        };
        let (mode, uid, gid) = (
            small(get_uint(b, at)),
            small(get_uint(b, at)),
            small(get_uint(b, at)),
        );
        let (mtime_sec, mtime_nsec) = if flags & PACKED_SAME_MTIME != 0 {
            (version.mtime_s, version.mtime_ns)
        } else {
            (get_int(b, at), small(get_uint(b, at)))
        };
        let nlink = small(get_uint(b, at));
        let dev = get_uint(b, at);
        let hash = (flags & PACKED_HASHED != 0).then(|| {
            let h = u128::from_le_bytes(b[*at..*at + 16].try_into().expect("16 bytes"));
            *at += 16;
            h
        });
        let stat = Stat {
            kind,
            version,
            meta: Meta {
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
            },
            nlink,
            dev,
        };
        (PathBuf::from(std::ffi::OsStr::from_bytes(path)), stat, hash)
    }
}

/// What [`Index::scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every entry, sorted by path (see [`path_order`]).
    pub entries: ScanEntries,
    /// Paths too long to replicate (not entered).
    pub too_long: Vec<PathBuf>,
    /// Folders that vanished before the walk entered them (renamed away
    /// or removed while it ran): what lay below them went unseen.
    pub vanished: usize,
}

/// What [`Index::scan`] reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rehash {
    /// Only what changed since the index last saw it.
    Changed,
    /// Every file (a full verification).
    All,
    /// Every file, its cached pages dropped first so that what is read is
    /// what the disk holds: after a failed flush, pages whose writeback
    /// failed are clean in the cache and would still read as written.
    FromDisk,
}

/// Hashes `name` in the folder `dir` (a file's content, a symlink's target).
pub(crate) fn hash_at(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::CStr,
    kind: Kind,
    from_disk: bool,
) -> std::io::Result<u128> {
    use rustix::fs::{Mode, OFlags};
    match kind {
        Kind::Dir => Ok(0),
        Kind::Symlink => Ok(hash_bytes(
            rustix::fs::readlinkat(dir, name, Vec::new())?.as_bytes(),
        )),
        Kind::File => {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if from_disk {
                rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::DontNeed)?;
            }
            super::tree::hash_file(std::fs::File::from(fd))
        }
    }
}

/// Same version, ignoring ctime when the index does not know it (after a
/// rename, which changes ctime but not content).
pub(crate) fn same_version(a: &Version, b: &Version) -> bool {
    a.size == b.size
        && a.mtime_s == b.mtime_s
        && a.mtime_ns == b.mtime_ns
        && a.ino == b.ino
        && ((a.ctime_s == 0 && a.ctime_ns == 0)
            || (a.ctime_s == b.ctime_s && a.ctime_ns == b.ctime_ns))
}

/// A manifest entry for the wire.
pub fn manifest_entry(rel: &Path, st: &Stat, hash: u128) -> ManifestEntry {
    ManifestEntry {
        path: rel.as_os_str().as_bytes().to_vec(),
        kind: st.kind.wire(),
        size: if st.kind == Kind::Dir {
            0
        } else {
            st.version.size
        },
        meta: st.meta,
        hash,
        // Names of one inode share it here (files only: what a link joins).
        link: if st.kind == Kind::File && st.nlink > 1 {
            st.version.ino
        } else {
            0
        },
    }
}

#[cfg(test)]
mod tests;
