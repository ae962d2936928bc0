//! Paths waiting to be sent, packed.
//!
//! A comparison with an empty replica queues every path of the store (a
//! million, say) before the coalescer takes them a few batches at a time.
//! A `(store, Box<Path>)` each would hold about 110 bytes a path; packed,
//! each path keeps only what it does not share with the one before it
//! (a comparison queues them in path order: most of a Maildir path is
//! its folder's), about 50 bytes (a fixture's paths, 74 bytes long on average).
//! A chunk that is full, and of which nothing was taken yet, is deflated
//! (level 1): Maildir names repeat their times, host and flags, so a path
//! then holds about 20 bytes. Only the chunk being taken from is inflated.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Bytes a chunk holds before the next one starts.
const CHUNK_BYTES: usize = 32 * 1024;

/// How hard a full chunk is deflated: the fastest level already takes a
/// fixture's paths from about 53 to about 20 bytes each.
const DEFLATE_LEVEL: u8 = 1;

/// A queue of `(store, path)`, first in first out (see the module's text).
#[derive(Debug, Default)]
pub struct Backlog {
    chunks: VecDeque<Chunk>,
    len: usize,
}

/// Entries as `store | bytes shared with the previous path | length of
/// the rest | the rest`, the numbers as LEB128; the first entry of a chunk
/// shares nothing, so chunks move between queues whole.
#[derive(Debug, Default)]
struct Chunk {
    /// The entries, deflated if `packed_from` is not zero.
    bytes: Vec<u8>,
    /// The length of the entries before they were deflated; zero while
    /// they are not.
    packed_from: usize,
    /// Entries not yet taken.
    left: usize,
    /// Where the next entry to take starts, and the path before it.
    at: usize,
    prev: Vec<u8>,
    /// The path pushed last (the tail chunk's).
    last: Vec<u8>,
}

fn put(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get(b: &[u8], at: &mut usize) -> usize {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let c = b[*at];
        *at += 1;
        v |= usize::from(c & 0x7f) << shift;
        if c & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

impl Chunk {
    /// The entry at `at` after `prev`, both moved past it.
    fn decode(bytes: &[u8], at: &mut usize, prev: &mut Vec<u8>) -> (usize, PathBuf) {
        let store = get(bytes, at);
        let shared = get(bytes, at);
        let rest = get(bytes, at);
        prev.truncate(shared);
        prev.extend_from_slice(&bytes[*at..*at + rest]);
        *at += rest;
        (store, PathBuf::from(OsStr::from_bytes(prev)))
    }

    /// Deflates a full chunk nothing was taken from yet (no other is).
    fn seal(&mut self) {
        if self.packed_from != 0 || self.at != 0 || self.bytes.is_empty() {
            return;
        }
        let packed = miniz_oxide::deflate::compress_to_vec(&self.bytes, DEFLATE_LEVEL);
        self.packed_from = self.bytes.len();
        self.bytes = packed;
        self.last = Vec::new();
    }

    /// The entries as they were pushed.
    fn entries(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.packed_from == 0 {
            return std::borrow::Cow::Borrowed(&self.bytes);
        }
        let raw = miniz_oxide::inflate::decompress_to_vec_with_limit(&self.bytes, self.packed_from)
            // Deflated by `seal` in this process from exactly this many
            // bytes: anything else is memory corruption, not input.
            .expect("a backlog chunk inflates to what was deflated");
        assert_eq!(
            raw.len(),
            self.packed_from,
            "a backlog chunk inflates whole"
        );
        std::borrow::Cow::Owned(raw)
    }

    /// Inflates the chunk to take entries from it.
    fn unseal(&mut self) {
        if self.packed_from != 0 {
            self.bytes = self.entries().into_owned();
            self.packed_from = 0;
        }
    }
}

impl Backlog {
    pub fn new() -> Backlog {
        Backlog::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        *self = Backlog::default();
    }

    pub fn push(&mut self, store: usize, rel: &Path) {
        let raw = rel.as_os_str().as_bytes();
        if self.chunks.back().is_none_or(|c| {
            c.packed_from != 0 || c.bytes.len() + raw.len() + 30 > CHUNK_BYTES.max(raw.len() + 30)
        }) {
            if let Some(full) = self.chunks.back_mut() {
                full.seal();
            }
            self.chunks.push_back(Chunk {
                bytes: Vec::with_capacity(CHUNK_BYTES.max(raw.len() + 30)),
                ..Chunk::default()
            });
        }
        let c = self.chunks.back_mut().expect("just made");
        let shared = c.last.iter().zip(raw).take_while(|(a, b)| a == b).count();
        put(&mut c.bytes, store);
        put(&mut c.bytes, shared);
        put(&mut c.bytes, raw.len() - shared);
        c.bytes.extend_from_slice(&raw[shared..]);
        c.last.clear();
        c.last.extend_from_slice(raw);
        c.left += 1;
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<(usize, PathBuf)> {
        let c = self.chunks.front_mut()?;
        c.unseal();
        let e = Chunk::decode(&c.bytes, &mut c.at, &mut c.prev);
        c.left -= 1;
        self.len -= 1;
        if c.left == 0 {
            self.chunks.pop_front();
        }
        Some(e)
    }

    /// Every entry, first to last, without taking them.
    pub fn iter(&self) -> impl Iterator<Item = (usize, PathBuf)> + '_ {
        self.chunks.iter().flat_map(|c| {
            let (mut at, mut prev) = (c.at, c.prev.clone());
            let bytes = c.entries();
            (0..c.left).map(move |_| Chunk::decode(&bytes, &mut at, &mut prev))
        })
    }

    /// Bytes the entries take (what their chunks hold).
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes.len()).sum()
    }

    /// Moves every entry of `other` behind this queue's.
    pub fn append(&mut self, other: &mut Backlog) {
        if other.is_empty() {
            return;
        }
        if let Some(last) = self.chunks.back_mut() {
            last.seal();
        }
        self.len += std::mem::take(&mut other.len);
        self.chunks.append(&mut other.chunks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever goes in comes out, in order, byte-exact, as a plain
        /// queue would give it.
        #[test]
        fn a_backlog_is_a_queue(
            ops in proptest::collection::vec(
                (0u8..4, 0usize..3, proptest::collection::vec(1u8..=255, 0..300)),
                1..600,
            ),
        ) {
            let mut b = Backlog::new();
            let mut other = Backlog::new();
            let mut model: VecDeque<(usize, PathBuf)> = VecDeque::new();
            let mut other_model: Vec<(usize, PathBuf)> = Vec::new();
            let mut last = Vec::new();
            for (op, store, tail) in ops {
                // Paths that share beginnings, as a comparison's do.
                let mut raw = last.clone();
                raw.truncate(tail.len() % (last.len() + 1));
                raw.extend_from_slice(&tail);
                last = raw.clone();
                let p = PathBuf::from(OsStr::from_bytes(&raw));
                match op {
                    0 | 1 => {
                        b.push(store, &p);
                        model.push_back((store, p));
                    }
                    2 => prop_assert_eq!(b.pop_front(), model.pop_front()),
                    _ => {
                        other.push(store, &p);
                        other_model.push((store, p));
                        if other_model.len().is_multiple_of(7) {
                            b.append(&mut other);
                            model.extend(other_model.drain(..));
                            prop_assert!(other.is_empty());
                        }
                    }
                }
                prop_assert_eq!(b.len(), model.len());
                prop_assert!(b.iter().eq(model.iter().cloned()));
            }
            while let Some(e) = b.pop_front() {
                prop_assert_eq!(Some(e), model.pop_front());
            }
            prop_assert!(model.is_empty() && b.is_empty());
        }
    }

    /// Maildir names as a comparison queues them: a path then holds
    /// less than half of what it would unpacked.
    #[test]
    fn full_chunks_of_maildir_names_are_deflated() {
        let paths: Vec<PathBuf> = (0..20_000u64)
            .map(|i| {
                let t = 1_700_000_000 + i * 7919 % 100_000;
                PathBuf::from(format!(
                    "user{:04}/Maildir/cur/{t}.M{}P{}Q{i}.mx.example.net,S={}:2,S",
                    i / 100,
                    i * 104_729 % 1_000_000,
                    i * 7_727 % 30_000,
                    i * 65_537 % 3_000_000
                ))
            })
            .collect();
        let mut b = Backlog::new();
        for p in &paths {
            b.push(0, p);
        }
        let raw: usize = paths.iter().map(|p| p.as_os_str().len()).sum();
        let held = b.held_bytes();
        assert!(held * 3 < raw, "{held} bytes held for {raw} bytes of paths");
        assert!(b.iter().map(|(_, p)| p).eq(paths.iter().cloned()));
        for p in &paths {
            assert_eq!(b.pop_front(), Some((0, p.clone())));
        }
        assert!(b.is_empty() && b.held_bytes() == 0);
    }

    #[test]
    fn a_path_longer_than_a_chunk_gets_one_of_its_own() {
        let mut b = Backlog::new();
        let long = PathBuf::from("x".repeat(CHUNK_BYTES * 2));
        b.push(0, Path::new("a"));
        b.push(1, &long);
        b.push(0, Path::new("b"));
        assert_eq!(b.pop_front(), Some((0, PathBuf::from("a"))));
        assert_eq!(b.pop_front(), Some((1, long)));
        assert_eq!(b.pop_front(), Some((0, PathBuf::from("b"))));
        assert_eq!(b.pop_front(), None);
    }
}
