//! A file being received, from its `File` header to its last byte: the
//! replica's decisions about it, sans-IO. Which path is admitted, whether a
//! data frame belongs to it and fits, and, once whole, whether its content
//! is the one announced. The receiver drives it with the staged file's
//! descriptor beside it; the data simulator drives it with the content in
//! memory, so both decide alike.

use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use super::Excludes;
use crate::wire::sync::Meta;

/// Admits a path a peer sent (bytes as received): a relative path the
/// filesystem checks accept (`fsops::check_rel`) and not excluded here. The
/// refusal says why; the driver answers it with `Refused`.
pub fn admit_path(raw: &[u8], excludes: &Excludes) -> Result<PathBuf, String> {
    match super::fsops::check_rel(raw) {
        // Excluded here but sent by the peer: the configurations differ.
        Ok(rel) if excludes.is_excluded(&rel) => Err("path is excluded on this node".into()),
        Ok(rel) => Ok(rel),
        Err(e) => Err(e.to_string()),
    }
}

/// A data frame that does not belong to the file being received: the
/// session is broken (the sender's fault).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("data for seq {got} inside file {expected}")]
    OtherFile { got: u64, expected: u64 },
    #[error("data for seq {seq} runs past its announced {size} bytes")]
    TooLong { seq: u64, size: u64 },
}

/// What became of a file whose last byte arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Refused at its header or set aside after it (no room, its staged
    /// file not made): already answered, its data was read and dropped.
    Dropped,
    /// The content differs from the hash its header announced (the file
    /// changed while the primary read it): discard it and ask again.
    Mismatch {
        seq: u64,
        store: usize,
        rel: PathBuf,
        got: u128,
        announced: u128,
    },
    /// Whole and as announced: it goes to the group commit.
    Whole {
        seq: u64,
        store: usize,
        rel: PathBuf,
        hash: u128,
        size: u64,
        meta: Meta,
        /// It lands in an inode of its own (see `SyncMsg::File`).
        apart: bool,
    },
}

/// The file whose data frames are arriving.
pub struct Reception {
    seq: u64,
    store: usize,
    /// `None` once refused or set aside: its data is read and dropped.
    rel: Option<PathBuf>,
    meta: Meta,
    size: u64,
    written: u64,
    hash: u128,
    hasher: Xxh3,
    apart: bool,
}

impl Reception {
    /// A `File` header arrived; `rel` is `None` when its path was refused.
    pub fn start(
        seq: u64,
        store: usize,
        rel: Option<PathBuf>,
        meta: Meta,
        size: u64,
        hash: u128,
        apart: bool,
    ) -> Reception {
        Reception {
            seq,
            store,
            rel,
            meta,
            size,
            written: 0,
            hash,
            hasher: Xxh3::new(),
            apart,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn store(&self) -> usize {
        self.store
    }

    /// The path it lands at (`None`: refused or set aside).
    pub fn rel(&self) -> Option<&Path> {
        self.rel.as_deref()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file will not be staged (no room, its staged file could not be
    /// made): its data is read and dropped. The path, for the answer.
    pub fn set_aside(&mut self) -> Option<PathBuf> {
        self.rel.take()
    }

    /// A data frame for `seq`: checked against the file and hashed. Returns
    /// the offset at which `bytes` belong.
    pub fn data(&mut self, seq: u64, bytes: &[u8]) -> Result<u64, DataError> {
        if seq != self.seq {
            return Err(DataError::OtherFile {
                got: seq,
                expected: self.seq,
            });
        }
        if self.written + bytes.len() as u64 > self.size {
            return Err(DataError::TooLong {
                seq,
                size: self.size,
            });
        }
        let offset = self.written;
        self.written += bytes.len() as u64;
        self.hasher.update(bytes);
        Ok(offset)
    }

    /// Whether every byte announced arrived (at once for an empty file).
    pub fn is_whole(&self) -> bool {
        self.written == self.size
    }

    /// The file is whole: what becomes of it.
    pub fn finish(self) -> Received {
        debug_assert!(self.is_whole(), "finished before its last byte");
        let Some(rel) = self.rel else {
            return Received::Dropped;
        };
        let got = self.hasher.digest128();
        if got != self.hash {
            return Received::Mismatch {
                seq: self.seq,
                store: self.store,
                rel,
                got,
                announced: self.hash,
            };
        }
        Received::Whole {
            seq: self.seq,
            store: self.store,
            rel,
            hash: self.hash,
            size: self.size,
            meta: self.meta,
            apart: self.apart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::index::hash_bytes;

    fn meta() -> Meta {
        Meta {
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 2,
        }
    }

    fn start(rel: Option<&str>, content: &[u8]) -> Reception {
        Reception::start(
            7,
            1,
            rel.map(PathBuf::from),
            meta(),
            content.len() as u64,
            hash_bytes(content),
            false,
        )
    }

    #[test]
    fn a_file_whose_frames_match_its_header_is_whole_and_staged() {
        let mut r = start(Some("cur/1:2,S"), b"hello world");
        assert!(!r.is_whole());
        assert_eq!(r.data(7, b"hello"), Ok(0));
        assert!(!r.is_whole());
        assert_eq!(r.data(7, b" world"), Ok(5));
        assert!(r.is_whole());
        assert_eq!(
            r.finish(),
            Received::Whole {
                seq: 7,
                store: 1,
                rel: "cur/1:2,S".into(),
                hash: hash_bytes(b"hello world"),
                size: 11,
                meta: meta(),
                apart: false,
            }
        );
    }

    #[test]
    fn an_empty_file_is_whole_at_its_header() {
        let r = start(Some("new/1"), b"");
        assert!(r.is_whole());
        assert!(matches!(r.finish(), Received::Whole { size: 0, .. }));
    }

    #[test]
    fn content_other_than_announced_is_asked_for_again_not_staged() {
        let mut r = start(Some("new/1"), b"hello");
        r.data(7, b"jello").unwrap();
        assert_eq!(
            r.finish(),
            Received::Mismatch {
                seq: 7,
                store: 1,
                rel: "new/1".into(),
                got: hash_bytes(b"jello"),
                announced: hash_bytes(b"hello"),
            }
        );
    }

    #[test]
    fn frames_of_another_file_or_past_the_size_break_the_session() {
        let mut r = start(Some("new/1"), b"hello");
        assert_eq!(
            r.data(8, b"h"),
            Err(DataError::OtherFile {
                got: 8,
                expected: 7
            })
        );
        assert_eq!(r.data(7, b"hell"), Ok(0));
        assert_eq!(
            r.data(7, b"o!"),
            Err(DataError::TooLong { seq: 7, size: 5 })
        );
        // The refused frame left nothing behind: the last byte still fits.
        assert_eq!(r.data(7, b"o"), Ok(4));
        assert!(r.is_whole());
    }

    #[test]
    fn a_refused_or_set_aside_file_reads_its_data_and_drops_it() {
        let mut r = start(None, b"hello");
        r.data(7, b"hello").unwrap();
        assert_eq!(r.finish(), Received::Dropped);
        let mut r = start(Some("new/1"), b"hello");
        assert_eq!(r.set_aside(), Some(PathBuf::from("new/1")));
        r.data(7, b"hello").unwrap();
        assert_eq!(r.finish(), Received::Dropped);
    }

    #[test]
    fn paths_are_admitted_only_relative_clean_and_not_excluded() {
        let ex = Excludes::new(&["**/dovecot.index.cache".to_string()]).unwrap();
        assert_eq!(admit_path(b"a/new/1", &ex), Ok(PathBuf::from("a/new/1")));
        for bad in [&b"/etc/passwd"[..], b"a/../b", b"", b"a//b", b"a/./b"] {
            assert!(admit_path(bad, &ex).is_err(), "{bad:?} admitted");
        }
        assert_eq!(
            admit_path(b"a/dovecot.index.cache", &ex),
            Err("path is excluded on this node".to_string())
        );
    }
}
