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
//! File `<state_dir>/takeover-<store>.bin`: `HSTK` | version u32 | count u64
//! | hashes u128 LE … | xxh3-64 of everything before it.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"HSTK";
const VERSION: u32 = 1;
/// Marker of a node that served as primary and was not reconciled since.
pub const FORMER_PRIMARY_FILE: &str = "former-primary";

pub fn record_path(state_dir: &Path, store: &str) -> PathBuf {
    state_dir.join(format!("takeover-{store}.bin"))
}

/// Writes the takeover record of `store` atomically and durably.
pub fn write(state_dir: &Path, store: &str, hashes: &HashSet<u128>) -> io::Result<()> {
    let mut sorted: Vec<u128> = hashes.iter().copied().collect();
    sorted.sort_unstable();
    let mut buf = Vec::with_capacity(16 + sorted.len() * 16 + 8);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    for h in sorted {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    crate::io::write_atomic_blocking(&record_path(state_dir, store), &buf)
}

/// The takeover record of `store`; `Ok(None)` when this node never took
/// over. A damaged file is an error naming it (never a guess: a wrong
/// record could delete a genuine conflict).
pub fn load(state_dir: &Path, store: &str) -> io::Result<Option<HashSet<u128>>> {
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

fn decode(bytes: &[u8]) -> Result<HashSet<u128>, String> {
    if bytes.len() < 24 || &bytes[..4] != MAGIC {
        return Err("not a takeover record".into());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 8);
    let sum = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let hashes = &body[16..];
    if hashes.len() as u64 != count.saturating_mul(16) {
        return Err(format!(
            "{count} hashes announced, {} bytes present",
            hashes.len()
        ));
    }
    Ok(hashes
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect())
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
        write(d.path(), "inbox", &set).unwrap();
        assert_eq!(load(d.path(), "inbox").unwrap(), Some(set));
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
