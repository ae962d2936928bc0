//! What a node held when it took over as primary, and whether it served as
//! primary and has not been reconciled since.
//!
//! After a failover the old primary's tree may hold changes the new primary
//! never got (its replication lag window). The new primary decides exactly
//! which: a version whose content it held at takeover was superseded by
//! what its users did since (follow the new primary); any other version is
//! a genuine conflict (kept aside, listed, restorable). The record is the
//! set of content hashes (files and symlinks) per store, written durably
//! each time a node starts serving as primary, with that tenure's epoch. It
//! lives until the peer is known reconciled (it says it is no former
//! primary) or this node serves as a replica; a node that restarts before
//! then carries the record of the tenure it interrupted into the new one
//! ([`carried_over`]), with the epoch of the earliest tenure it covers and
//! the highest of the peer's own epochs this node knew of as that tenure
//! began (its floor).
//! The carried part counts only if the peer says it last served as primary
//! at or below that floor (`PeerState { served_epoch }`): a tenure this
//! node had heard of before it took over. A peer that served while this
//! node was down had users of its own, whose versions this node never saw,
//! and only the fresh part of the record may decide about them (anything
//! else is kept aside, never deleted); epoch numbers alone cannot tell, as
//! a node that never heard of an epoch may later serve below it. A record
//! found where this tenure's should be (it could not be rewritten at the
//! promotion) counts only as carried.
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
//! mtime_s i64, mtime_ns u32) LE … | epoch u64 | floor u64 | carried epoch
//! u64 (0: nothing carried) | carried floor u64 | carried count u64 |
//! carried hashes u128 LE … |
//! xxh3-64 of everything before it. Versions 1 (hashes only) and 2 (no
//! epochs) of earlier releases are read as settled records.
//!
//! Versions sent to a former primary after the record was written are
//! appended, before their bytes leave, to `<state_dir>/takeover-<store>.sent`
//! (24 bytes each: hash u128 LE | xxh3-64 of those 16 bytes), so that a new
//! primary that crashes still knows them: the former primary may hold
//! them, and a version it holds that this node sent is never a conflict.
//! Reading stops at the first entry that does not check (a torn append):
//! a hash left out only keeps a version aside, one read wrongly could
//! delete one. Writing a record removes the log first (the record then
//! holds everything known).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::index::{Index, Kind, Rehash, Version};
use super::tree::LocalTree;

const MAGIC: &[u8; 4] = b"HSTK";
/// Version 3: the record is live (see [`Record::live`]) and knows its
/// tenure's epoch; 1 and 2 are read as settled records of earlier releases.
const VERSION: u32 = 3;
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
    /// Written by this release: a record is removed once the peer is known
    /// reconciled, so one present at a promotion belongs to the same
    /// failover and is carried into the new one (see [`carried_over`]).
    pub live: bool,
    /// The epoch of the tenure that wrote it (0: an earlier release's).
    pub epoch: u64,
    /// The highest of the peer's own epochs this node knew of as it
    /// promoted to `epoch` (0: none): a tenure of the peer at or below it
    /// began before.
    pub floor: u64,
    /// What earlier tenures of this node, interrupted before their peer
    /// was reconciled, held and sent.
    pub carried: Option<Carried>,
}

/// The record of earlier tenures carried into a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// The earliest tenure it covers.
    pub epoch: u64,
    /// The highest of the peer's own epochs this node knew of as that
    /// tenure began: the carried part counts only if the peer last served
    /// at or below it (a tenure this node had heard of before it took
    /// over). Epoch numbers alone do not order tenures in time: a node that
    /// never heard of an epoch may later serve below it; and only the
    /// peer's own epochs are known to it for sure (one of this node's may
    /// never have reached it).
    pub floor: u64,
    pub hashes: HashSet<u128>,
}

impl Record {
    /// The versions this record says were held: its own, and the carried
    /// ones if the peer (a former primary) last served as primary at
    /// `peer_served` and this node knew of that tenure as the carried ones
    /// began (see [`Carried::floor`]). A peer that does not say (an
    /// earlier release) gets the fresh part only.
    pub fn held(&self, peer_served: Option<u64>) -> (HashSet<u128>, Option<&Carried>) {
        let mut held = self.hashes.clone();
        let carried = self
            .carried
            .as_ref()
            .filter(|c| peer_served.is_some_and(|served| served <= c.floor && served < c.epoch));
        if let Some(c) = carried {
            held.extend(&c.hashes);
        }
        (held, carried)
    }

    /// The record as a carried part only: a record of an earlier tenure
    /// found where this tenure's should be (it could not be rewritten at
    /// this promotion) never counts as this tenure's own.
    pub fn into_carried(self) -> Record {
        let carried = carry(self);
        Record {
            live: true,
            carried: Some(carried),
            ..Record::default()
        }
    }
}

/// Everything `rec` knows, as a carried part from its earliest tenure.
fn carry(rec: Record) -> Carried {
    let mut hashes = rec.hashes;
    let (mut epoch, mut floor) = (rec.epoch, rec.floor);
    if let Some(c) = rec.carried {
        hashes.extend(c.hashes);
        if c.epoch < epoch {
            (epoch, floor) = (c.epoch, c.floor);
        }
    }
    Carried {
        epoch,
        floor,
        hashes,
    }
}
/// Marker of a node that served as primary and was not reconciled since.
pub const FORMER_PRIMARY_FILE: &str = "former-primary";

pub fn record_path(state_dir: &Path, store: &str) -> PathBuf {
    state_dir.join(format!("takeover-{store}.bin"))
}

/// What a promotion carries over from the record of an earlier tenure of
/// this node that is still live (it took over, then restarted before its
/// peer, a former primary, was reconciled): the versions it held then and
/// sent since, which that peer may hold. `None` without one (a first
/// takeover, a settled record, a record of an earlier release); a record
/// or log that cannot be read is logged and carries nothing (versions kept
/// aside, never deleted).
pub fn carried_over(state_dir: &Path, store: &str) -> Option<Carried> {
    let rec = match load(state_dir, store) {
        Ok(Some(r)) if r.live => r,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(
                store,
                "the earlier takeover record is unreadable ({e}): not carried over"
            );
            return None;
        }
    };
    let mut carried = carry(rec);
    match load_sent(state_dir, store) {
        Ok(sent) => carried.hashes.extend(sent),
        Err(e) => tracing::warn!(store, "the versions sent since the earlier takeover record are unreadable ({e}): not carried over"),
    }
    Some(carried)
}

/// The peer is known reconciled (or never served as primary), or this node
/// serves as its replica now: the record of `store` and its log are
/// settled, and the next promotion starts a record of its own.
pub fn settle(state_dir: &Path, store: &str) -> io::Result<()> {
    let mut removed = false;
    for p in [
        sent_log_path(state_dir, store),
        record_path(state_dir, store),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if removed {
        std::fs::File::open(state_dir)?.sync_all()?;
    }
    Ok(())
}

/// The log of versions sent since the record of `store` was written.
pub fn sent_log_path(state_dir: &Path, store: &str) -> PathBuf {
    state_dir.join(format!("takeover-{store}.sent"))
}

/// Bytes of one entry of the sent log.
const SENT_ENTRY_BYTES: usize = 24;

/// Appends `hashes` to the sent log of `store`; flushed to disk with
/// `durable` (a crash of the process keeps what was written either way).
pub fn append_sent(
    state_dir: &Path,
    store: &str,
    hashes: &[u128],
    durable: bool,
) -> io::Result<()> {
    use std::io::Write;
    let mut buf = Vec::with_capacity(hashes.len() * SENT_ENTRY_BYTES);
    for h in hashes {
        let b = h.to_le_bytes();
        buf.extend_from_slice(&b);
        buf.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&b).to_le_bytes());
    }
    let path = sent_log_path(state_dir, store);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    f.write_all(&buf)?;
    if durable {
        f.sync_data()?;
    }
    Ok(())
}

/// The hashes of the sent log of `store` (none if there is none), up to
/// the first entry that does not check.
pub fn load_sent(state_dir: &Path, store: &str) -> io::Result<Vec<u128>> {
    let bytes = match std::fs::read(sent_log_path(state_dir, store)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(bytes
        .chunks_exact(SENT_ENTRY_BYTES)
        .map_while(|e| {
            let (h, sum) = e.split_at(16);
            (xxhash_rust::xxh3::xxh3_64(h).to_le_bytes() == sum)
                .then(|| u128::from_le_bytes(h.try_into().expect("16 bytes")))
        })
        .collect())
}

/// Writes the takeover record of `store` atomically and durably, its sent
/// log removed first (a crash in between only forgets versions: kept
/// aside, never deleted).
pub fn write(state_dir: &Path, store: &str, rec: &Record) -> io::Result<()> {
    let mut hashes: Vec<u128> = rec.hashes.iter().copied().collect();
    hashes.sort_unstable();
    write_sorted(
        state_dir,
        store,
        &hashes,
        &rec.pending,
        (rec.epoch, rec.floor),
        rec.carried.as_ref(),
    )
}

/// [`write`] with the record's own hashes sorted and without repeats (a
/// promotion collects them so: a million of them take 16 MB, not the
/// 36 MB of a set).
pub fn write_sorted(
    state_dir: &Path,
    store: &str,
    hashes: &[u128],
    pending: &[Pending],
    (epoch, floor): (u64, u64),
    carried: Option<&Carried>,
) -> io::Result<()> {
    match std::fs::remove_file(sent_log_path(state_dir, store)) {
        Ok(()) => std::fs::File::open(state_dir)?.sync_all()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Streamed into the file (a million-file store's record is 16 MB),
    // the checksum taken on the way.
    crate::io::write_atomic_with(&record_path(state_dir, store), |w| {
        let mut out = Summed {
            w,
            sum: xxhash_rust::xxh3::Xxh3::new(),
        };
        out.put(MAGIC)?;
        out.put(&VERSION.to_le_bytes())?;
        put_sorted(&mut out, hashes)?;
        out.put(&(pending.len() as u64).to_le_bytes())?;
        for p in pending {
            out.put(&p.ino.to_le_bytes())?;
            out.put(&p.size.to_le_bytes())?;
            out.put(&p.mtime_s.to_le_bytes())?;
            out.put(&p.mtime_ns.to_le_bytes())?;
        }
        out.put(&epoch.to_le_bytes())?;
        out.put(&floor.to_le_bytes())?;
        match carried {
            Some(c) => {
                // Epoch 0 says "nothing carried": a carried part is of a real
                // tenure (epochs start at 1).
                out.put(&c.epoch.max(1).to_le_bytes())?;
                out.put(&c.floor.to_le_bytes())?;
                let mut sorted: Vec<u128> = c.hashes.iter().copied().collect();
                sorted.sort_unstable();
                put_sorted(&mut out, &sorted)?;
            }
            None => {
                out.put(&0u64.to_le_bytes())?;
                out.put(&0u64.to_le_bytes())?;
                put_sorted(&mut out, &[])?;
            }
        }
        let sum = out.sum.digest();
        out.w.write_all(&sum.to_le_bytes())
    })
}

/// A writer that checksums what goes through it.
struct Summed<'a> {
    w: &'a mut dyn io::Write,
    sum: xxhash_rust::xxh3::Xxh3,
}

impl Summed<'_> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.sum.update(b);
        self.w.write_all(b)
    }
}

/// Count, then the hashes in order (the same set, the same bytes).
fn put_sorted(out: &mut Summed<'_>, sorted: &[u128]) -> io::Result<()> {
    out.put(&(sorted.len() as u64).to_le_bytes())?;
    for h in sorted {
        out.put(&h.to_le_bytes())?;
    }
    Ok(())
}

/// `count` hashes of 16 bytes at the start of `bytes`, and the rest.
fn take_hashes(bytes: &[u8], count: u64, what: &str) -> Result<(HashSet<u128>, usize), String> {
    let end = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(16))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| format!("{count} {what} announced, {} bytes present", bytes.len()))?;
    let hashes = bytes[..end]
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect();
    Ok((hashes, end))
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
    if !(1..=VERSION).contains(&version) {
        return Err(format!("unknown version {version}"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let (hashes, used) = take_hashes(&body[16..], count, "hashes")?;
    let hashes_end = 16 + used;
    let rest = &body[hashes_end..];
    if version == 1 {
        if !rest.is_empty() {
            return Err(format!("{} bytes after the hashes", rest.len()));
        }
        return Ok(Record {
            hashes,
            ..Record::default()
        });
    }
    if rest.len() < 8 {
        return Err("the pending count is missing".into());
    }
    let pending_count = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let pending_bytes = usize::try_from(pending_count)
        .ok()
        .and_then(|c| c.checked_mul(PENDING_BYTES))
        .filter(|&n| n <= rest.len() - 8)
        .ok_or_else(|| {
            format!(
                "{pending_count} pending files announced, {} bytes present",
                rest.len() - 8
            )
        })?;
    let (pending, tail) = rest[8..].split_at(pending_bytes);
    let pending = pending
        .chunks_exact(PENDING_BYTES)
        .map(|c| Pending {
            ino: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            size: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
            mtime_s: i64::from_le_bytes(c[16..24].try_into().expect("8 bytes")),
            mtime_ns: u32::from_le_bytes(c[24..28].try_into().expect("4 bytes")),
        })
        .collect();
    if version == 2 {
        if !tail.is_empty() {
            return Err(format!("{} bytes after the pending files", tail.len()));
        }
        return Ok(Record {
            hashes,
            pending,
            ..Record::default()
        });
    }
    const EPOCHS: usize = 40;
    if tail.len() < EPOCHS {
        return Err("the epochs are missing".into());
    }
    let at = |i: usize| u64::from_le_bytes(tail[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (epoch, floor, carried_epoch, carried_floor, carried_count) =
        (at(0), at(1), at(2), at(3), at(4));
    let (carried_hashes, used) = take_hashes(&tail[EPOCHS..], carried_count, "carried hashes")?;
    if EPOCHS + used != tail.len() {
        return Err(format!(
            "{} bytes after the carried hashes",
            tail.len() - EPOCHS - used
        ));
    }
    let carried = match carried_epoch {
        0 if carried_hashes.is_empty() && carried_floor == 0 => None,
        0 => return Err("a carried part without an epoch".into()),
        epoch => Some(Carried {
            epoch,
            floor: carried_floor,
            hashes: carried_hashes,
        }),
    };
    Ok(Record {
        hashes,
        pending,
        live: true,
        epoch,
        floor,
        carried,
    })
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
    for (_, e) in index.iter() {
        if e.kind == Kind::File && pending.remove(&Pending::of(&e.version)) {
            hashes.insert(e.hash());
        }
    }
    if !pending.is_empty() {
        // One folder at a time: the tree is never listed into memory. To
        // its end (an abandoned walk would keep one under way from
        // forgetting what is gone).
        let mut walk = super::walk::Walk::new(index, Rehash::Changed, false);
        while let Some((rel, st, hash)) = walk.next(tree, index, excludes)? {
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
///
/// The file holds when it was written and the epoch of the tenure
/// (`<unix seconds> <epoch>`): the epoch a former primary says it last
/// served at (see [`served_epoch`]).
pub fn mark_former_primary(state_dir: &Path, epoch: u64) -> io::Result<()> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::io::write_atomic_blocking(
        &state_dir.join(FORMER_PRIMARY_FILE),
        format!("{secs} {epoch}\n").as_bytes(),
    )
}

/// The epoch of the last tenure the former-primary mark records; `None`
/// without a mark or for a mark of an earlier release (time only).
pub fn served_epoch(state_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(state_dir.join(FORMER_PRIMARY_FILE)).ok()?;
    let mut words = text.split_whitespace();
    words.next()?;
    words.next()?.parse().ok()
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

    /// A live record of this release (tenure epoch 3, taken knowing of
    /// epoch 2, nothing carried).
    fn live(hashes: &[u128], pending: &[Pending]) -> Record {
        Record {
            hashes: hashes.iter().copied().collect(),
            pending: pending.to_vec(),
            live: true,
            epoch: 3,
            floor: 2,
            carried: None,
        }
    }

    #[test]
    fn the_sent_log_is_read_up_to_a_torn_entry_and_a_record_write_removes_it() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_sent(d.path(), "inbox").unwrap().is_empty());
        append_sent(d.path(), "inbox", &[5, u128::MAX], false).unwrap();
        append_sent(d.path(), "inbox", &[9], true).unwrap();
        assert_eq!(load_sent(d.path(), "inbox").unwrap(), [5, u128::MAX, 9]);
        // A crash in the middle of an append: the torn entry and anything
        // after it never count as sent (a version kept aside, never one
        // deleted on a guess).
        let p = sent_log_path(d.path(), "inbox");
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(b.len() - 5);
        std::fs::write(&p, &b).unwrap();
        assert_eq!(load_sent(d.path(), "inbox").unwrap(), [5, u128::MAX]);
        let mut b = std::fs::read(&p).unwrap();
        b[3] ^= 0x10;
        std::fs::write(&p, &b).unwrap();
        assert!(load_sent(d.path(), "inbox").unwrap().is_empty());
        // The record written next holds what is known: the log goes.
        append_sent(d.path(), "inbox", &[1], false).unwrap();
        write(d.path(), "inbox", &live(&[1, 5], &[])).unwrap();
        assert!(!p.exists());
        assert!(load_sent(d.path(), "inbox").unwrap().is_empty());
    }

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
        let mut rec = live(&[], &pending);
        rec.hashes = set;
        rec.carried = Some(Carried {
            epoch: 2,
            floor: 1,
            hashes: [7, 8].into_iter().collect(),
        });
        write(d.path(), "inbox", &rec).unwrap();
        assert_eq!(load(d.path(), "inbox").unwrap(), Some(rec));
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
        assert!(!r.live, "a record of an earlier release is settled");
    }

    #[test]
    fn a_live_record_and_its_log_are_carried_over_until_settled() {
        let d = tempfile::tempdir().unwrap();
        assert!(carried_over(d.path(), "inbox").is_none());
        write(d.path(), "inbox", &live(&[1], &[])).unwrap();
        append_sent(d.path(), "inbox", &[2], true).unwrap();
        let r = carried_over(d.path(), "inbox").unwrap();
        assert_eq!(r.hashes, [1, 2].into_iter().collect());
        assert_eq!((r.epoch, r.floor), (3, 2), "the tenure it covers");
        // A record that carried an earlier one carries both, from the
        // earliest tenure.
        let mut next = live(&[4], &[]);
        (next.epoch, next.floor) = (5, 4);
        next.carried = Some(r);
        write(d.path(), "inbox", &next).unwrap();
        let r = carried_over(d.path(), "inbox").unwrap();
        assert_eq!(r.hashes, [1, 2, 4].into_iter().collect());
        assert_eq!((r.epoch, r.floor), (3, 2));
        // A record found where this tenure's should be is carried whole.
        let whole = load(d.path(), "inbox").unwrap().unwrap().into_carried();
        assert!(whole.hashes.is_empty() && whole.pending.is_empty());
        let c = whole.carried.unwrap();
        assert_eq!(c.hashes, [1, 2, 4].into_iter().collect());
        assert_eq!((c.epoch, c.floor), (3, 2));
        settle(d.path(), "inbox").unwrap();
        assert!(carried_over(d.path(), "inbox").is_none());
        assert!(!record_path(d.path(), "inbox").exists());
        assert!(!sent_log_path(d.path(), "inbox").exists());
        // A version 2 record (written by a release that never settled its
        // records) may be of any earlier failover: not carried over.
        write(d.path(), "inbox", &live(&[1], &[])).unwrap();
        let p = record_path(d.path(), "inbox");
        let mut b = std::fs::read(&p).unwrap();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        // Version 2 ends after the pending files (no epochs).
        b.truncate(b.len() - 8 - 40);
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        assert!(!load(d.path(), "inbox").unwrap().unwrap().live);
        assert!(carried_over(d.path(), "inbox").is_none());
    }

    #[test]
    fn a_carried_part_counts_only_for_a_peer_tenure_known_before_it_began() {
        let mut rec = live(&[1], &[]);
        (rec.epoch, rec.floor) = (6, 5);
        rec.carried = Some(Carried {
            epoch: 4,
            floor: 3,
            hashes: [7].into_iter().collect(),
        });
        let with: HashSet<u128> = [1, 7].into_iter().collect();
        let without: HashSet<u128> = [1].into_iter().collect();
        // The peer last served at 3, a tenure this node knew of as it took
        // over at 4: nothing its users did since is unknown here.
        assert_eq!(rec.held(Some(3)).0, with);
        assert!(rec.held(Some(3)).1.is_some());
        assert_eq!(rec.held(Some(1)).0, with);
        // It served at 5 or later, since the carried tenure began.
        assert_eq!(rec.held(Some(5)).0, without);
        assert_eq!(rec.held(Some(7)).0, without);
        // Numbers alone do not order tenures: a carried tenure taken at 5
        // knowing only of 2 says nothing about a peer that served at 4 (it
        // may have done so later, never having heard of 5).
        rec.carried = Some(Carried {
            epoch: 5,
            floor: 2,
            hashes: [7].into_iter().collect(),
        });
        assert_eq!(rec.held(Some(4)).0, without);
        assert_eq!(rec.held(Some(2)).0, with);
        // It does not say (an earlier release): the fresh part only.
        assert_eq!(rec.held(None).0, without);
    }

    #[test]
    fn the_mark_says_the_epoch_served_and_a_mark_of_an_earlier_release_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(served_epoch(d.path()), None);
        mark_former_primary(d.path(), 9).unwrap();
        assert!(is_former_primary(d.path()));
        assert_eq!(served_epoch(d.path()), Some(9));
        std::fs::write(d.path().join(FORMER_PRIMARY_FILE), "1700000000\n").unwrap();
        assert!(is_former_primary(d.path()));
        assert_eq!(served_epoch(d.path()), None);
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
        mark_former_primary(d.path(), 1).unwrap();
        assert!(is_former_primary(d.path()));
        clear_former_primary(d.path()).unwrap();
        clear_former_primary(d.path()).unwrap();
        assert!(!is_former_primary(d.path()));
    }
}
