//! The sources a replica holds for renames onto protected paths, on disk.
//!
//! A rename onto a genuine conflict that cannot be moved aside leaves the
//! replica's only copy of the message at the rename's source, held there
//! until the conflict moves (`apply::Applier`). The primary meanwhile
//! deletes that source, and every session's comparison deletes it again.
//! A replica process that restarted would forget the hold, and its next
//! session would delete the message before the conflict could move: the
//! file keeps the hold across restarts. The receiver writes it (durably)
//! whenever the holds changed, before it answers the ops that changed
//! them; the engine reads it when it starts, and removes it when the node
//! serves as primary (its tree is the primary's then).
//!
//! File `<state_dir>/held-for-rename`, binary (names are byte strings, not
//! necessarily UTF-8): the header line, the number of holds (u32 LE), then
//! per hold the store's name (u16 LE length, bytes), the held source and
//! the target it waits for (u32 LE length, bytes, each relative to the
//! store), and last the xxh3-64 (LE) of everything before it. No file: no
//! hold.

use std::collections::HashMap;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::apply::{HeldForRename, HELD_FOR_RENAME_MAX};
use super::tree::REL_PATH_BYTES_MAX;

/// The file's name in the state directory.
pub const HELD_FILE: &str = "held-for-rename";

const HEADER: &[u8] = b"hasync held-for-rename 1\n";

/// A store name longer than this is not one the config accepts.
const STORE_NAME_BYTES_MAX: usize = 255;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(HELD_FILE)
}

/// A hold file that cannot be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("cannot read the sources held for renames {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the sources held for renames {path} are garbled at byte {at}: {why}")]
    Garbled {
        path: PathBuf,
        at: usize,
        why: &'static str,
    },
}

/// Writes `held` durably (temp, fsync, rename, directory fsync), or
/// removes the file when nothing is held. `stores` names the stores by
/// their index in `held`.
pub fn save(state_dir: &Path, stores: &[String], held: &HeldForRename) -> io::Result<()> {
    let path = path(state_dir);
    if held.is_empty() {
        return match std::fs::remove_file(&path) {
            Ok(()) => std::fs::File::open(state_dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
    }
    crate::io::write_atomic_blocking(&path, &encode(stores, held)?)
}

fn encode(stores: &[String], held: &HeldForRename) -> io::Result<Vec<u8>> {
    // In order, so that the same holds make the same file.
    let mut entries: Vec<_> = held.iter().collect();
    entries.sort_unstable();
    let mut out = HEADER.to_vec();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for ((s, from), to) in entries {
        let store = stores
            .get(*s)
            .ok_or_else(|| io::Error::other(format!("no store {s} to name a held source in")))?;
        out.extend_from_slice(&(store.len() as u16).to_le_bytes());
        out.extend_from_slice(store.as_bytes());
        for p in [from, to] {
            let b = p.as_os_str().as_bytes();
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The holds the file keeps, by the index in `stores` of the store each
/// is in; holds in stores no longer configured are left out (their
/// number is returned beside). No file: nothing held.
pub fn load(state_dir: &Path, stores: &[String]) -> Result<(HeldForRename, usize), HeldError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((HashMap::new(), 0)),
        Err(source) => return Err(HeldError::Read { path, source }),
    };
    decode(&bytes, stores).map_err(|(at, why)| HeldError::Garbled { path, at, why })
}

fn decode(
    bytes: &[u8],
    stores: &[String],
) -> Result<(HeldForRename, usize), (usize, &'static str)> {
    if !bytes.starts_with(HEADER) {
        return Err((0, "not a file of held sources (header)"));
    }
    if bytes.len() < HEADER.len() + 4 + 8 {
        return Err((bytes.len(), "cut short"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != sum {
        return Err((body.len(), "checksum mismatch"));
    }
    let mut c = Cursor {
        body,
        at: HEADER.len(),
    };
    let count = u32::from_le_bytes(c.take(4)?.try_into().expect("4 bytes")) as usize;
    // The holds and as many old names of renamed folders (see `Applier`).
    if count > 2 * HELD_FOR_RENAME_MAX {
        return Err((HEADER.len(), "more holds than a replica keeps"));
    }
    let mut held = HashMap::with_capacity(count);
    let mut dropped = 0;
    for _ in 0..count {
        let n = u16::from_le_bytes(c.take(2)?.try_into().expect("2 bytes")) as usize;
        if n > STORE_NAME_BYTES_MAX {
            return Err((c.at, "store name too long"));
        }
        let store = c.take(n)?.to_vec();
        let mut paths = [PathBuf::new(), PathBuf::new()];
        for p in paths.iter_mut() {
            let n = u32::from_le_bytes(c.take(4)?.try_into().expect("4 bytes")) as usize;
            if n > REL_PATH_BYTES_MAX {
                return Err((c.at, "path too long"));
            }
            let at = c.at;
            *p = super::fsops::check_rel(c.take(n)?).map_err(|_| (at, "not a relative path"))?;
        }
        let [from, to] = paths;
        match stores.iter().position(|s| s.as_bytes() == store) {
            Some(s) => {
                held.insert((s, from), to);
            }
            None => dropped += 1,
        }
    }
    if c.at != body.len() {
        return Err((c.at, "bytes after the last hold"));
    }
    Ok((held, dropped))
}

/// Reads the body front to back.
struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], (usize, &'static str)> {
        let b = self
            .body
            .get(self.at..self.at.saturating_add(n))
            .ok_or((self.at, "cut short"))?;
        self.at += n;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn stores() -> Vec<String> {
        vec!["inbox".into(), "quarantine".into()]
    }

    fn some_holds() -> HeldForRename {
        let mut held = HashMap::new();
        held.insert(
            (0, PathBuf::from("u/Maildir/new/1.M1.mx1")),
            PathBuf::from("u/Maildir/cur/1.M1.mx1:2,S"),
        );
        held.insert(
            (1, PathBuf::from(OsStr::from_bytes(b"caf\xe9/new/2"))),
            PathBuf::from("x/cur/2:2,"),
        );
        held
    }

    #[test]
    fn holds_survive_a_round_trip_byte_exact_and_nothing_held_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), &stores()).unwrap(), (HashMap::new(), 0));
        save(dir.path(), &stores(), &some_holds()).unwrap();
        assert_eq!(load(dir.path(), &stores()).unwrap(), (some_holds(), 0));
        // A store no longer configured: its hold is left out, and counted.
        let only_inbox = vec!["inbox".to_string()];
        let (held, dropped) = load(dir.path(), &only_inbox).unwrap();
        assert_eq!((held.len(), dropped), (1, 1));
        save(dir.path(), &stores(), &HashMap::new()).unwrap();
        assert!(!path(dir.path()).exists());
        save(dir.path(), &stores(), &HashMap::new()).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_that_names_it_and_where() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &stores(), &some_holds()).unwrap();
        let good = std::fs::read(path(dir.path())).unwrap();
        for (i, cut) in [
            good[..good.len() - 1].to_vec(),
            {
                let mut b = good.clone();
                b[HEADER.len() + 6] ^= 1;
                b
            },
            b"something else".to_vec(),
        ]
        .into_iter()
        .enumerate()
        {
            std::fs::write(path(dir.path()), &cut).unwrap();
            let e = load(dir.path(), &stores()).unwrap_err().to_string();
            assert!(
                e.contains("held-for-rename") && e.contains("at byte"),
                "{i}: {e}"
            );
        }
        // A checksum that matches does not make an unbounded count valid.
        let mut b = HEADER.to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let e = decode(&b, &stores()).unwrap_err();
        assert_eq!(e.1, "more holds than a replica keeps");
        // Nor an absolute path.
        let mut held = HashMap::new();
        held.insert((0, PathBuf::from("/etc/passwd")), PathBuf::from("a"));
        let b = encode(&stores(), &held).unwrap();
        assert_eq!(decode(&b, &stores()).unwrap_err().1, "not a relative path");
    }
}
