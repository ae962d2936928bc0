//! What a node held when it took over as primary, and whether it served as
//! primary and has not been reconciled since.
//!
//! After a failover the old primary's tree may hold changes the new primary
//! never got (its replication lag window). The new primary decides exactly
//! which: a version whose content it held at takeover was superseded by
//! what its users did since (follow the new primary); any other version is
//! a genuine conflict (kept aside, listed, restorable). The record is the
//! set of content hashes (files and symlinks) per store, written durably
//! each time a node starts serving as primary.
//!
//! Taking over reads no file: a version the index already knows gives its
//! hash; any other file is recorded by what identifies its version without
//! reading it ([`Pending`]: inode, size, mtime). The record is completed
//! only when a former primary asks for it ([`complete`]): from the hashes
//! the sender took as it sent those files since, or by reading the files
//! still unchanged. A file changed before it was read has no takeover hash:
//! a former primary's version of it is kept aside (a conflict too many,
//! never a version lost). A new primary over a tree it never indexed (a
//! first start) so reads each file once, to send it, not twice.
//!
//! File `<state_dir>/takeover-<store>.bin`: `HSTK` | version u32 | count u64
//! | hashes u128 LE … | pending count u64 | pending (ino u64, size u64,
//! mtime_s i64, mtime_ns u32) LE … | xxh3-64 of everything before it.
//! Version 1 (no pending part) is still read.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::index::{Index, Kind, Rehash, Version};
use super::tree::LocalTree;

const MAGIC: &[u8; 4] = b"HSTK";
const VERSION: u32 = 2;
/// Bytes of one [`Pending`] in the file.
const PENDING_BYTES: usize = 28;

/// A file held at takeover whose content was not hashed then: what
/// identifies its version without reading it (a rename keeps all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pending {
    pub ino: u64,
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
}

impl Pending {
    pub fn of(v: &Version) -> Pending {
        Pending {
            ino: v.ino,
            size: v.size,
            mtime_s: v.mtime_s,
            mtime_ns: v.mtime_ns,
        }
    }
}

/// What a node held when it took over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub hashes: HashSet<u128>,
    /// Files whose hash is still to be taken (see [`complete`]).
    pub pending: Vec<Pending>,
}
/// Marker of a node that served as primary and was not reconciled since.
pub const FORMER_PRIMARY_FILE: &str = "former-primary";

pub fn record_path(state_dir: &Path, store: &str) -> PathBuf {
    state_dir.join(format!("takeover-{store}.bin"))
}

/// Writes the takeover record of `store` atomically and durably.
pub fn write(
    state_dir: &Path,
    store: &str,
    hashes: &HashSet<u128>,
    pending: &[Pending],
) -> io::Result<()> {
    let mut sorted: Vec<u128> = hashes.iter().copied().collect();
    sorted.sort_unstable();
    let mut buf = Vec::with_capacity(24 + sorted.len() * 16 + pending.len() * PENDING_BYTES + 8);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    for h in sorted {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    buf.extend_from_slice(&(pending.len() as u64).to_le_bytes());
    for p in pending {
        buf.extend_from_slice(&p.ino.to_le_bytes());
        buf.extend_from_slice(&p.size.to_le_bytes());
        buf.extend_from_slice(&p.mtime_s.to_le_bytes());
        buf.extend_from_slice(&p.mtime_ns.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    crate::io::write_atomic_blocking(&record_path(state_dir, store), &buf)
}

/// The takeover record of `store`; `Ok(None)` when this node never took
/// over. A damaged file is an error naming it (never a guess: a wrong
/// record could delete a genuine conflict).
pub fn load(state_dir: &Path, store: &str) -> io::Result<Option<Record>> {
    let path = record_path(state_dir, store);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    decode(&bytes).map(Some).map_err(|why| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    })
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    if bytes.len() < 24 || &bytes[..4] != MAGIC {
        return Err("not a takeover record".into());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 8);
    let sum = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    if version != 1 && version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let count = u64_at(8);
    let hashes_end = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(16))
        .and_then(|b| b.checked_add(16))
        .filter(|&end| end <= body.len())
        .ok_or_else(|| {
            format!(
                "{count} hashes announced, {} bytes present",
                body.len() - 16
            )
        })?;
    let hashes = body[16..hashes_end]
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect();
    let rest = &body[hashes_end..];
    if version == 1 {
        if !rest.is_empty() {
            return Err(format!("{} bytes after the hashes", rest.len()));
        }
        return Ok(Record {
            hashes,
            pending: Vec::new(),
        });
    }
    if rest.len() < 8 {
        return Err("the pending count is missing".into());
    }
    let pending_count = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let pending = &rest[8..];
    if pending.len() as u64 != pending_count.saturating_mul(PENDING_BYTES as u64) {
        return Err(format!(
            "{pending_count} pending files announced, {} bytes present",
            pending.len()
        ));
    }
    let pending = pending
        .chunks_exact(PENDING_BYTES)
        .map(|c| Pending {
            ino: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            size: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
            mtime_s: i64::from_le_bytes(c[16..24].try_into().expect("8 bytes")),
            mtime_ns: u32::from_le_bytes(c[24..28].try_into().expect("4 bytes")),
        })
        .collect();
    Ok(Record { hashes, pending })
}

/// Takes the hashes a record still lacks: from `index` where it knows a
/// pending version (the sender hashed it as it sent it), else by reading
/// the files still holding their takeover version, into `hashes`. Returns
/// how many pending files changed or went before they were read (their
/// takeover content is unknown). On an error, `hashes` holds what was
/// taken until then (each a version held: never one too many).
pub fn complete<T: LocalTree>(
    pending: Vec<Pending>,
    hashes: &mut HashSet<u128>,
    tree: &T,
    index: &mut Index,
    excludes: &crate::model::Excludes,
) -> io::Result<usize> {
    let mut pending: HashSet<Pending> = pending.into_iter().collect();
    for e in index.entries.values() {
        if e.kind == Kind::File && pending.remove(&Pending::of(&e.version)) {
            hashes.insert(e.hash());
        }
    }
    if !pending.is_empty() {
        let scan = tree.scan(index, excludes, Rehash::Changed)?;
        for (rel, st, hash) in scan.entries {
            if st.kind != Kind::File || !pending.remove(&Pending::of(&st.version)) {
                continue;
            }
            let hash = match hash {
                Some(h) => h,
                None => match tree.hash(&rel, Kind::File) {
                    Ok(h) => h,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                },
            };
            hashes.insert(hash);
        }
    }
    Ok(pending.len())
}

/// Marks this node as one that serves (served) as primary: until a primary
/// has reconciled it completely, its sessions as secondary decide conflicts
/// exactly.
pub fn mark_former_primary(state_dir: &Path) -> io::Result<()> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::io::write_atomic_blocking(
        &state_dir.join(FORMER_PRIMARY_FILE),
        format!("{secs}\n").as_bytes(),
    )
}

pub fn is_former_primary(state_dir: &Path) -> bool {
    state_dir.join(FORMER_PRIMARY_FILE).exists()
}

/// A primary reconciled this node completely: it is a plain secondary now.
pub fn clear_former_primary(state_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(state_dir.join(FORMER_PRIMARY_FILE)) {
        Ok(()) => {
            std::fs::File::open(state_dir)?.sync_all()?;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_damage_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path(), "inbox").unwrap(), None);
        let set: HashSet<u128> = [1, u128::MAX, 42].into_iter().collect();
        let pending = vec![Pending {
            ino: 7,
            size: u64::MAX,
            mtime_s: -1,
            mtime_ns: 999_999_999,
        }];
        write(d.path(), "inbox", &set, &pending).unwrap();
        assert_eq!(
            load(d.path(), "inbox").unwrap(),
            Some(Record {
                hashes: set,
                pending
            })
        );
        let p = record_path(d.path(), "inbox");
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = load(d.path(), "inbox").unwrap_err().to_string();
        assert!(
            e.contains("takeover-inbox.bin") && e.contains("checksum"),
            "{e}"
        );
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn a_record_of_the_first_version_is_still_read() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&5u128.to_le_bytes());
        b.extend_from_slice(&9u128.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let r = decode(&b).unwrap();
        assert_eq!(r.hashes, [5, 9].into_iter().collect());
        assert!(r.pending.is_empty());
    }

    #[test]
    fn pending_files_take_their_hash_from_the_index_or_the_disk_and_a_changed_one_none() {
        use crate::replica::index::{hash_bytes, Entry};
        use crate::replica::tree::Tree;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        std::fs::create_dir_all(root.join("cur")).unwrap();
        for (name, body) in [("cur/a", "alpha"), ("cur/b", "bravo"), ("cur/c", "charlie")] {
            std::fs::write(root.join(name), body).unwrap();
        }
        let tree = Tree::open(&root).unwrap();
        let st = |rel: &str| tree.lstat(Path::new(rel)).unwrap().unwrap();
        let (a, b, c) = (st("cur/a"), st("cur/b"), st("cur/c"));
        let mut hashes: HashSet<u128> = [1].into_iter().collect();
        let pending = [a, b, c].iter().map(|s| Pending::of(&s.version)).collect();
        // The sender sent `a` since (under a new name): the index holds
        // its hash, which is taken without reading (a marker hash here).
        let mut index = Index::in_memory();
        index.set("cur/a:2,S".into(), Entry::new(&a, 77, true));
        // `b` is renamed, unchanged; `c` is rewritten before anyone read it.
        std::fs::rename(root.join("cur/b"), root.join("cur/b:2,S")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(root.join("cur/c"), "changed").unwrap();
        let excludes = crate::model::Excludes::new(&[]).unwrap();
        let dropped = complete(pending, &mut hashes, &tree, &mut index, &excludes).unwrap();
        assert_eq!(
            hashes,
            [1, 77, hash_bytes(b"bravo")].into_iter().collect(),
            "the index's hash for a, the disk's for b, none for the changed c"
        );
        assert_eq!(dropped, 1);
    }

    #[test]
    fn the_former_primary_mark_comes_and_goes() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_former_primary(d.path()));
        mark_former_primary(d.path()).unwrap();
        assert!(is_former_primary(d.path()));
        clear_former_primary(d.path()).unwrap();
        clear_former_primary(d.path()).unwrap();
        assert!(!is_former_primary(d.path()));
    }
}
