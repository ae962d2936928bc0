//! Per-store index of the local tree: each path's content hash (a cache, so
//! unchanged files are not re-hashed) and whether the peer is known to hold
//! exactly this version (`synced`, the common base used to decide conflicts).
//!
//! Losing the index costs only work and caution: every file is re-hashed,
//! and files that differ from the peer are kept aside rather than replaced.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::model::{path_order, PathHasher};
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

/// An index's entries: every path it knows, with what it knew of it.
pub type Entries = HashMap<Box<Path>, Entry, PathHasher>;

/// The index of one store.
#[derive(Debug)]
pub struct Index {
    /// Keyed by boxed paths (16 bytes, not a PathBuf's 24): one per file.
    pub entries: Entries,
    file: PathBuf,
    dirty: bool,
    /// The mark of the latest walk ([`Index::begin_walk`]).
    walk_mark: u8,
}

/// The index file of an older release (JSON, UTF-8 names only): read once
/// to migrate, then replaced by the binary file.
#[derive(Deserialize)]
struct OnDisk {
    version: u32,
    entries: Vec<(PathBuf, Entry)>,
}

/// An index as it was at one moment, to be written elsewhere.
pub struct Snapshot {
    file: PathBuf,
    entries: Vec<(Box<Path>, Entry)>,
}

impl Snapshot {
    /// Writes the snapshot atomically and durably (what [`Index::save`] does).
    pub fn write(self) -> std::io::Result<()> {
        write_entries(&self.file, self.entries.iter().map(|(p, e)| (&**p, e)))
    }
}

/// Binary index file: `HSIX` | version u32 | entry count u64, then per
/// entry `path length u16 | path bytes | kind u8 | synced u8 | size u64 |
/// mtime s i64, ns u32 | inode u64 | ctime s i64, ns u32 | mode, uid, gid
/// u32 | hash u128`, all little-endian, then the xxh3-64 of everything
/// before it. Names are stored as the bytes the filesystem has (a name need
/// not be UTF-8).
const MAGIC: &[u8; 4] = b"HSIX";
const FORMAT_VERSION: u32 = 1;
/// Fixed bytes of one entry after its path.
const ENTRY_FIXED: usize = 2 + 8 + 12 + 8 + 12 + 12 + 16;

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

fn encode_entry(out: &mut Vec<u8>, p: &Path, e: &Entry) {
    let raw = p.as_os_str().as_bytes();
    out.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    out.extend_from_slice(raw);
    out.push(match e.kind {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
    });
    out.push(u8::from(e.synced));
    let v = &e.version;
    out.extend_from_slice(&v.size.to_le_bytes());
    out.extend_from_slice(&v.mtime_s.to_le_bytes());
    out.extend_from_slice(&v.mtime_ns.to_le_bytes());
    out.extend_from_slice(&v.ino.to_le_bytes());
    out.extend_from_slice(&v.ctime_s.to_le_bytes());
    out.extend_from_slice(&v.ctime_ns.to_le_bytes());
    out.extend_from_slice(&e.mode.to_le_bytes());
    out.extend_from_slice(&e.uid.to_le_bytes());
    out.extend_from_slice(&e.gid.to_le_bytes());
    out.extend_from_slice(&e.hash().to_le_bytes());
}

/// Sorted by path, so the file is stable for the same index.
fn write_entries<'a>(
    file: &Path,
    entries: impl Iterator<Item = (&'a Path, &'a Entry)>,
) -> std::io::Result<()> {
    let mut entries: Vec<(&Path, &Entry)> = entries.collect();
    entries.sort_unstable_by(|a, b| path_order(a.0, b.0));
    crate::io::write_atomic_with(file, |w| {
        let mut sum = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (p, e) in entries {
            if p.as_os_str().len() > u16::MAX as usize {
                // Cannot be replicated either (longer than any path the
                // wire carries); leaving it out only costs a re-hash.
                continue;
            }
            encode_entry(&mut buf, p, e);
            if buf.len() >= 60 * 1024 {
                sum.update(&buf);
                w.write_all(&buf)?;
                buf.clear();
            }
        }
        sum.update(&buf);
        buf.extend_from_slice(&sum.digest().to_le_bytes());
        w.write_all(&buf)
    })
}

/// The checksum that seals an index file (xxh3-64 of everything before it).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Checks an index file's bytes as [`Index::load`] reads them: how many
/// entries it holds, or the error naming `file` and where. For tools and
/// fuzzing.
pub fn check_bytes(file: &Path, bytes: &[u8]) -> Result<usize, IndexError> {
    decode_entries(file, bytes).map(|e| e.len())
}

/// Decodes an index file's bytes (checked before anything is trusted).
fn decode_entries(file: &Path, bytes: &[u8]) -> Result<Entries, IndexError> {
    use std::os::unix::ffi::OsStrExt as _;
    let corrupt = |offset: usize, entry: u64, problem: String| IndexError::Corrupt {
        file: file.to_path_buf(),
        offset,
        entry,
        problem,
    };
    if bytes.len() < 16 + 8 {
        return Err(corrupt(0, 0, format!("only {} bytes", bytes.len())));
    }
    if &bytes[..4] != MAGIC {
        return Err(corrupt(0, 0, "not a hasync index (bad magic)".into()));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 8);
    let want = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
    if xxhash_rust::xxh3::xxh3_64(body) != want {
        return Err(corrupt(
            body.len(),
            0,
            "checksum mismatch (torn or damaged file)".into(),
        ));
    }
    let version = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(corrupt(4, 0, format!("unknown format version {version}")));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    // Each entry takes at least its fixed part: a count the file cannot hold
    // is refused before anything is reserved.
    if count > (body.len() / (2 + ENTRY_FIXED)) as u64 {
        return Err(corrupt(8, 0, format!("{count} entries cannot fit")));
    }
    let mut entries = HashMap::with_capacity_and_hasher(count as usize, PathHasher::default());
    let mut at = 16;
    for n in 0..count {
        let take = |at: &mut usize, len: usize| -> Result<&[u8], IndexError> {
            let s = body
                .get(*at..*at + len)
                .ok_or_else(|| corrupt(*at, n, "truncated entry".into()))?;
            *at += len;
            Ok(s)
        };
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let start = at;
        let len = u16::from_le_bytes(take(&mut at, 2)?.try_into().expect("2 bytes")) as usize;
        let raw = take(&mut at, len)?;
        if raw.is_empty() || raw.contains(&0) || raw.first() == Some(&b'/') {
            return Err(corrupt(start, n, "bad path".into()));
        }
        let f = take(&mut at, ENTRY_FIXED)?;
        let kind = match f[0] {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            k => return Err(corrupt(start, n, format!("unknown kind {k}"))),
        };
        let synced = match f[1] {
            0 => false,
            1 => true,
            b => return Err(corrupt(start, n, format!("bad synced flag {b}"))),
        };
        let version = Version {
            size: u64_at(f, 2),
            mtime_s: u64_at(f, 10) as i64,
            mtime_ns: u32_at(f, 18),
            ino: u64_at(f, 22),
            ctime_s: u64_at(f, 30) as i64,
            ctime_ns: u32_at(f, 38),
        };
        let hash = u128::from_le_bytes(f[54..70].try_into().expect("16 bytes"));
        let entry = Entry {
            kind,
            version,
            mode: u32_at(f, 42),
            uid: u32_at(f, 46),
            gid: u32_at(f, 50),
            hash: split128(hash),
            synced,
            mark: 0,
        };
        let path: Box<Path> = Path::new(std::ffi::OsStr::from_bytes(raw)).into();
        if entries.insert(path, entry).is_some() {
            return Err(corrupt(start, n, "path listed twice".into()));
        }
    }
    if at != body.len() {
        return Err(corrupt(
            at,
            count,
            format!("{} trailing bytes", body.len() - at),
        ));
    }
    Ok(entries)
}

impl Index {
    /// Loads `<state_dir>/index-<store>.bin` (or migrates an older
    /// `index-<store>.json`). A missing index starts empty; an unreadable
    /// one starts empty and says why, which is safe: files are re-hashed
    /// and conflicts kept aside.
    pub fn load(state_dir: &Path, store: &str) -> Index {
        let file = state_dir.join(format!("index-{store}.bin"));
        let legacy = state_dir.join(format!("index-{store}.json"));
        let (entries, dirty) = match std::fs::read(&file) {
            Ok(b) => match decode_entries(&file, &b) {
                Ok(e) => (e, false),
                Err(e) => {
                    warn!("{e}; starting empty: files will be re-hashed and conflicts kept aside");
                    (HashMap::default(), false)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read(&legacy) {
                Ok(b) => match serde_json::from_slice::<OnDisk>(&b) {
                    Ok(d) if d.version == 1 => (
                        d.entries
                            .into_iter()
                            .map(|(p, e)| (p.into_boxed_path(), e))
                            .collect(),
                        // Rewritten in the binary format at the next save.
                        true,
                    ),
                    Ok(d) => {
                        warn!(file = %legacy.display(), "index version {} unknown; starting empty", d.version);
                        (HashMap::default(), false)
                    }
                    Err(e) => {
                        warn!(file = %legacy.display(), "index unreadable ({e}); starting empty: files will be re-hashed and conflicts kept aside");
                        (HashMap::default(), false)
                    }
                },
                Err(_) => (HashMap::default(), false),
            },
            Err(e) => {
                warn!(
                    "{}; starting empty",
                    IndexError::Io {
                        file: file.clone(),
                        source: e
                    }
                );
                (HashMap::default(), false)
            }
        };
        Index {
            entries,
            file,
            dirty,
            walk_mark: 0,
        }
    }

    /// An index kept in memory only (a simulated store): never saved.
    pub fn in_memory() -> Index {
        Index {
            entries: HashMap::default(),
            file: PathBuf::new(),
            dirty: false,
            walk_mark: 0,
        }
    }

    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the index durably if it changed.
    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        write_entries(&self.file, self.entries.iter().map(|(p, e)| (&**p, e)))?;
        // Migrated: the older JSON file must not be read again.
        let _ = std::fs::remove_file(self.file.with_extension("json"));
        self.dirty = false;
        Ok(())
    }

    /// An owned copy of a changed index, for [`Snapshot::write`] on another
    /// thread (the sender's loop must not stop for a sort, a serialization
    /// and an fsync). `None` if nothing changed since the last save. Call
    /// [`Index::mark_dirty`] if writing the snapshot fails.
    pub fn snapshot(&mut self) -> Option<Snapshot> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(Snapshot {
            file: self.file.clone(),
            entries: self
                .entries
                .iter()
                .map(|(p, e)| (p.clone(), e.clone()))
                .collect(),
        })
    }

    /// Is the file at `rel` (now `st`) exactly the version the peer holds?
    pub fn unchanged_and_synced(&self, rel: &Path, st: &Stat) -> bool {
        self.entries
            .get(rel)
            .is_some_and(|e| e.synced && e.kind == st.kind && same_version(&e.version, &st.version))
    }

    pub fn set(&mut self, rel: PathBuf, mut entry: Entry) {
        // Known now: a walk under way does not forget it.
        entry.mark = self.walk_mark;
        self.entries.insert(rel.into_boxed_path(), entry);
        self.dirty = true;
    }

    /// Starts a walk ([`super::walk::Walk`]): returns its mark. What the
    /// walk visits, and what is set or moved while it runs, gets the mark;
    /// [`Index::end_walk`] forgets the rest. A later walk supersedes an
    /// earlier one still under way (that one then forgets nothing).
    pub fn begin_walk(&mut self) -> u8 {
        // No entry keeps an earlier walk's mark (nor one copied in with
        // entries from elsewhere): one pass, as cheap as the walk's own.
        for e in self.entries.values_mut() {
            e.mark = 0;
        }
        self.walk_mark = self.walk_mark.checked_add(1).unwrap_or(1);
        self.walk_mark
    }

    /// The entry at `rel`, marked as found by the walk `mark` (unless a
    /// later walk began: its marks are not overwritten).
    pub fn visit(&mut self, rel: &Path, mark: u8) -> Option<&Entry> {
        let current = self.walk_mark;
        let e = self.entries.get_mut(rel)?;
        if mark == current {
            e.mark = mark;
        }
        Some(e)
    }

    /// The walk `mark` has found everything: forgets what it did not find
    /// (gone from the store), unless a later walk began meanwhile.
    pub fn end_walk(&mut self, mark: u8) {
        if mark != self.walk_mark {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|_, e| e.mark == mark);
        if self.entries.len() != before {
            self.dirty = true;
        }
    }

    pub fn get(&self, rel: &Path) -> Option<&Entry> {
        self.entries.get(rel)
    }

    pub fn get_mut(&mut self, rel: &Path) -> Option<&mut Entry> {
        self.entries.get_mut(rel)
    }

    /// Room for `n` more entries in one allocation (instead of doublings
    /// that briefly hold the table twice).
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// Forgets `rel` and everything under it. A file is one lookup; only a
    /// directory (or an unknown path) walks the index.
    pub fn remove_tree(&mut self, rel: &Path) {
        if self.entries.get(rel).is_some_and(|e| e.kind != Kind::Dir) {
            self.entries.remove(rel);
            self.dirty = true;
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|p, _| !p.starts_with(rel));
        if self.entries.len() != before {
            self.dirty = true;
        }
    }

    /// Marks `rel` and everything under it as not held by the replica.
    /// Marks `rel` and the folders below it as not held by the replica
    /// (each is listed again when sent); files keep what is known of them.
    pub fn unsync_folders(&mut self, rel: &Path) {
        self.unsync_below(rel, true);
    }

    pub fn unsync_tree(&mut self, rel: &Path) {
        self.unsync_below(rel, false);
    }

    fn unsync_below(&mut self, rel: &Path, folders_only: bool) {
        if let Some(e) = self.entries.get_mut(rel) {
            e.synced = false;
            if e.kind != Kind::Dir {
                return;
            }
        }
        for (_, e) in self
            .entries
            .iter_mut()
            .filter(|(p, e)| (!folders_only || e.kind == Kind::Dir) && p.starts_with(rel))
        {
            e.synced = false;
        }
    }

    /// Moves `from` (and everything under it) to `to`. Renaming a file
    /// (a Maildir flag change) costs a few lookups, not a walk of the index.
    pub fn rename_tree(&mut self, from: &Path, to: &Path) {
        if self.entries.get(from).is_some_and(|e| e.kind != Kind::Dir)
            && !self.entries.get(to).is_some_and(|e| e.kind == Kind::Dir)
        {
            if let Some(mut e) = self.entries.remove(from) {
                e.version.ctime_s = 0;
                e.version.ctime_ns = 0;
                e.mark = self.walk_mark;
                self.entries.insert(to.into(), e);
            }
            self.dirty = true;
            return;
        }
        let moved: Vec<(PathBuf, Entry)> = self
            .entries
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, e)| {
                let rest = p.strip_prefix(from).expect("filtered on prefix");
                let np = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
                (np, e.clone())
            })
            .collect();
        self.remove_tree(to);
        self.entries.retain(|p, _| !p.starts_with(from));
        for (p, mut e) in moved {
            // A rename changes ctime; match on the rest of the version.
            e.version.ctime_s = 0;
            e.version.ctime_ns = 0;
            e.mark = self.walk_mark;
            self.entries.insert(p.into_boxed_path(), e);
        }
        self.dirty = true;
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

/// One entry a scan found: its path, what it is, its hash when known.
pub type ScanEntry = (PathBuf, Stat, Option<u128>);

/// What [`Index::scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every entry, sorted by path (see [`path_order`]).
    pub entries: Vec<ScanEntry>,
    /// Paths too long to replicate (not entered).
    pub too_long: Vec<PathBuf>,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, ino: u64) -> Entry {
        let st = Stat {
            kind,
            version: Version::sample(ino),
            meta: Meta {
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime_sec: 1,
                mtime_nsec: 2,
            },
            nlink: 1,
            dev: 1,
        };
        Entry::new(&st, u128::MAX - ino as u128, true)
    }

    fn index(entries: &[(&str, Kind)]) -> Index {
        let mut ix = Index {
            entries: HashMap::default(),
            file: PathBuf::from("/nonexistent/index.json"),
            dirty: false,
            walk_mark: 0,
        };
        for (i, (p, k)) in entries.iter().enumerate() {
            ix.set(PathBuf::from(p), entry(*k, i as u64));
        }
        ix
    }

    fn paths(ix: &Index) -> Vec<String> {
        let mut v: Vec<String> = ix.entries.keys().map(|p| p.display().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn file_and_directory_renames_and_removals_keep_the_tree_consistent() {
        let mut ix = index(&[
            ("a", Kind::Dir),
            ("a/cur", Kind::Dir),
            ("a/cur/1:2,", Kind::File),
            ("a/cur/2:2,", Kind::File),
            ("ab", Kind::File),
            ("b", Kind::Dir),
            ("b/y", Kind::File),
        ]);
        let hash = ix.get(Path::new("a/cur/1:2,")).unwrap().hash();
        // A flag change moves one entry, with its hash, and forgets ctime.
        ix.rename_tree(Path::new("a/cur/1:2,"), Path::new("a/cur/1:2,S"));
        let moved = ix.get(Path::new("a/cur/1:2,S")).unwrap();
        assert_eq!(moved.hash(), hash);
        assert_eq!((moved.version.ctime_s, moved.version.ctime_ns), (0, 0));
        assert!(ix.get(Path::new("a/cur/1:2,")).is_none());
        // A directory rename moves its subtree, and only its subtree.
        ix.rename_tree(Path::new("a"), Path::new("c"));
        assert_eq!(
            paths(&ix),
            ["ab", "b", "b/y", "c", "c/cur", "c/cur/1:2,S", "c/cur/2:2,"]
        );
        // A file removal removes the file; a directory removal its subtree.
        ix.remove_tree(Path::new("c/cur/2:2,"));
        ix.remove_tree(Path::new("b"));
        assert_eq!(paths(&ix), ["ab", "c", "c/cur", "c/cur/1:2,S"]);
        // A file renamed over a directory replaces the whole directory.
        ix.rename_tree(Path::new("ab"), Path::new("c"));
        assert_eq!(paths(&ix), ["c"]);
        assert_eq!(ix.get(Path::new("c")).unwrap().kind, Kind::File);
    }

    #[test]
    fn names_round_trip_byte_exact_through_the_index_file() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let mut ix = Index::load(dir.path(), "inbox");
        let odd = [
            &b"m/cur/1"[..],
            b"m/cur/latin1-\xe9t\xe9",
            b"m/cur/\xff\xfe not utf-8",
            b"m/new/line\nbreak",
        ];
        for (i, raw) in odd.iter().enumerate() {
            ix.set(
                PathBuf::from(std::ffi::OsStr::from_bytes(raw)),
                entry(Kind::File, i as u64),
            );
        }
        ix.save().unwrap();
        let back = Index::load(dir.path(), "inbox");
        assert_eq!(back.entries, ix.entries);
        for raw in odd {
            assert!(back
                .get(Path::new(std::ffi::OsStr::from_bytes(raw)))
                .is_some());
        }
    }

    #[test]
    fn a_damaged_index_is_refused_naming_the_file_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = Index::load(dir.path(), "inbox");
        ix.set(PathBuf::from("m/cur/1"), entry(Kind::File, 7));
        ix.set(PathBuf::from("m/cur/2"), entry(Kind::File, 8));
        ix.save().unwrap();
        let file = dir.path().join("index-inbox.bin");
        let good = std::fs::read(&file).unwrap();
        let mut bad = good.clone();
        bad[30] ^= 1;
        let err = decode_entries(&file, &bad).unwrap_err().to_string();
        assert!(
            err.contains("index-inbox.bin") && err.contains("checksum"),
            "{err}"
        );
        std::fs::write(&file, &bad).unwrap();
        assert!(Index::load(dir.path(), "inbox").entries.is_empty());
        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len() {
            assert!(decode_entries(&file, &good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn an_index_of_an_older_release_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry(Kind::File, 3);
        let json = serde_json::json!({ "version": 1, "entries": [["m/cur/1", e]] });
        std::fs::write(dir.path().join("index-inbox.json"), json.to_string()).unwrap();
        let mut ix = Index::load(dir.path(), "inbox");
        assert_eq!(ix.get(Path::new("m/cur/1")), Some(&e));
        ix.save().unwrap();
        assert!(!dir.path().join("index-inbox.json").exists());
        assert_eq!(
            Index::load(dir.path(), "inbox").get(Path::new("m/cur/1")),
            Some(&e)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_index_bytes_are_refused_without_panicking(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            sealed in proptest::bool::ANY,
        ) {
            let mut bytes = bytes;
            if sealed && bytes.len() >= 16 {
                // Past the checksum, so the entry parser itself is exercised.
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
                bytes.extend_from_slice(&sum.to_le_bytes());
            }
            let _ = decode_entries(Path::new("/x/index-a.bin"), &bytes);
        }
    }

    #[test]
    fn a_snapshot_written_elsewhere_is_the_index_of_its_moment() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = Index::load(dir.path(), "inbox");
        assert!(ix.snapshot().is_none(), "nothing changed, nothing to write");
        ix.set(PathBuf::from("m/cur/1"), entry(Kind::File, 1));
        let snap = ix.snapshot().expect("changed");
        assert!(!ix.is_dirty());
        // A change after the snapshot is not in it, and keeps the index dirty.
        ix.set(PathBuf::from("m/cur/2"), entry(Kind::File, 2));
        std::thread::spawn(move || snap.write())
            .join()
            .unwrap()
            .unwrap();
        let back = Index::load(dir.path(), "inbox");
        assert_eq!(back.get(Path::new("m/cur/1")), ix.get(Path::new("m/cur/1")));
        assert!(back.get(Path::new("m/cur/2")).is_none());
        assert!(ix.is_dirty());
        ix.save().unwrap();
        assert!(Index::load(dir.path(), "inbox")
            .get(Path::new("m/cur/2"))
            .is_some());
        // A failed background write is marked so the next save retries.
        let mut ix = Index::load(dir.path(), "inbox");
        ix.mark_dirty();
        assert!(ix.snapshot().is_some());
    }
}
