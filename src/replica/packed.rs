//! Long lists of path-keyed entries held in memory, packed: a comparison's
//! backlog of paths to send, a walk held for the first comparison.
//!
//! Both hold up to a million entries in path order, so most of a path is
//! the one before it (a Maildir path is mostly its folder's). Each entry
//! keeps only what its path does not share with the previous one, then
//! its own fields as LEB128 numbers. Past the first
//! [`DEFLATE_AFTER_BYTES`] of a list, a chunk that is full, and of which
//! nothing was taken yet, is deflated (level 1): Maildir names repeat
//! their times, host and flags, and a scan's numbers repeat their owners,
//! modes and times. Only the chunk being taken from is inflated. A
//! fixture's paths, 74 bytes long on average, then hold about 20 bytes
//! each, against about 110 as `(usize, Box<Path>)`. The first chunks
//! stay as they are: deflating a 20,000-file store's scan took a tenth
//! of the walk that made it (the CPU of a restart's catch-up) to save a
//! megabyte or two.

use std::collections::VecDeque;
use std::marker::PhantomData;

/// Bytes a chunk holds before the next one starts (an entry that does
/// not fit is kept whole: the chunk grows past it).
const CHUNK_BYTES: usize = 32 * 1024;

/// How hard a full chunk is deflated: the fastest level already takes a
/// fixture's paths from about 53 to about 20 bytes each.
const DEFLATE_LEVEL: u8 = 1;

/// What a list holds before its full chunks are deflated (a scan of about
/// 80,000 Maildir entries, a backlog of about 100,000 paths).
pub const DEFLATE_AFTER_BYTES: usize = 4 << 20;

/// What a packed list holds: a path and fields of its own.
pub trait Record: Sized {
    /// The path the entry is kept in order by (bytes, as on disk).
    fn path(&self) -> &[u8];
    /// Appends the entry's other fields to `out`.
    fn put_fields(&self, out: &mut Vec<u8>);
    /// The entry whose path is `path` and whose fields start at `at`
    /// (moved past them).
    fn unpack(path: &[u8], bytes: &[u8], at: &mut usize) -> Self;
}

/// Appends `v` as LEB128.
pub fn put_uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 number at `at`, moving past it. The bytes were written
/// by [`put_uint`] in this process.
pub fn get_uint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let c = b[*at];
        *at += 1;
        v |= u64::from(c & 0x7f) << shift;
        if c & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Appends a signed number (zigzag, then LEB128).
pub fn put_int(out: &mut Vec<u8>, v: i64) {
    put_uint(out, ((v << 1) ^ (v >> 63)) as u64);
}

pub fn get_int(b: &[u8], at: &mut usize) -> i64 {
    let u = get_uint(b, at);
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// A queue of entries, first in first out (see the module's text).
#[derive(Debug)]
pub struct Packed<T> {
    chunks: VecDeque<Chunk>,
    len: usize,
    /// What the chunks' bytes come to.
    bytes: usize,
    /// Full chunks are deflated once the list holds this much.
    deflate_after: usize,
    of: PhantomData<fn() -> T>,
}

impl<T> Default for Packed<T> {
    fn default() -> Self {
        Packed {
            chunks: VecDeque::new(),
            len: 0,
            bytes: 0,
            deflate_after: DEFLATE_AFTER_BYTES,
            of: PhantomData,
        }
    }
}

/// Entries as `bytes shared with the previous path | length of the rest |
/// the rest | the entry's fields`, the numbers as LEB128; the first entry
/// of a chunk shares nothing, so chunks move between queues whole.
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
    /// The path pushed last (while entries are still pushed).
    last: Vec<u8>,
}

impl Chunk {
    /// The entry at `at` after `prev`, both moved past it.
    fn decode<T: Record>(bytes: &[u8], at: &mut usize, prev: &mut Vec<u8>) -> T {
        let shared = get_uint(bytes, at) as usize;
        let rest = get_uint(bytes, at) as usize;
        prev.truncate(shared);
        prev.extend_from_slice(&bytes[*at..*at + rest]);
        *at += rest;
        T::unpack(prev, bytes, at)
    }

    /// Deflates a full chunk nothing was taken from yet (no other is)
    /// where that makes it smaller; returns the bytes it gave back.
    fn seal(&mut self) -> usize {
        if self.packed_from != 0 || self.at != 0 || self.bytes.is_empty() {
            return 0;
        }
        let mut packed = miniz_oxide::deflate::compress_to_vec(&self.bytes, DEFLATE_LEVEL);
        if packed.len() >= self.bytes.len() {
            // Nothing to gain (random names): kept as it is.
            return 0;
        }
        // It comes in a buffer of half the input or more, all of it
        // written: without this, a chunk would hold that much.
        packed.shrink_to_fit();
        self.packed_from = self.bytes.len();
        self.bytes = packed;
        self.last = Vec::new();
        self.packed_from - self.bytes.len()
    }

    /// The entries as they were pushed.
    fn entries(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.packed_from == 0 {
            return std::borrow::Cow::Borrowed(&self.bytes);
        }
        let raw = miniz_oxide::inflate::decompress_to_vec_with_limit(&self.bytes, self.packed_from)
            // Deflated by `seal` in this process from exactly this many
            // bytes: anything else is memory corruption, not input.
            .expect("a packed chunk inflates to what was deflated");
        assert_eq!(raw.len(), self.packed_from, "a packed chunk inflates whole");
        std::borrow::Cow::Owned(raw)
    }

    /// Inflates the chunk to take entries from it; returns the bytes it
    /// grew by.
    fn unseal(&mut self) -> usize {
        if self.packed_from == 0 {
            return 0;
        }
        let packed = self.bytes.len();
        self.bytes = self.entries().into_owned();
        self.packed_from = 0;
        self.bytes.len() - packed
    }
}

impl<T: Record> Packed<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A list that deflates its full chunks once it holds `bytes` (tests
    /// of deflating measure on smaller lists than [`DEFLATE_AFTER_BYTES`]).
    #[cfg(test)]
    pub fn deflating_after(bytes: usize) -> Self {
        Packed {
            deflate_after: bytes,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        *self = Packed {
            deflate_after: self.deflate_after,
            ..Self::default()
        };
    }

    /// Bytes the entries take (what their chunks hold).
    /// (Kept as they change: a walk asks after every entry. The property
    /// test checks it against the chunks.)
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, e: &T) {
        self.push_with(e.path(), |out| e.put_fields(out));
    }

    /// Pushes the entry at `path` whose fields `fields` appends, for a
    /// caller that holds them borrowed.
    pub fn push_with(&mut self, path: &[u8], fields: impl FnOnce(&mut Vec<u8>)) {
        if self
            .chunks
            .back()
            .is_none_or(|c| c.packed_from != 0 || c.bytes.len() >= CHUNK_BYTES)
        {
            if let Some(full) = self
                .chunks
                .back_mut()
                .filter(|_| self.bytes >= self.deflate_after)
            {
                self.bytes -= full.seal();
            }
            self.chunks.push_back(Chunk {
                bytes: Vec::with_capacity(CHUNK_BYTES + 256),
                ..Chunk::default()
            });
        }
        let c = self.chunks.back_mut().expect("just made");
        let before = c.bytes.len();
        let shared = c.last.iter().zip(path).take_while(|(a, b)| a == b).count();
        put_uint(&mut c.bytes, shared as u64);
        put_uint(&mut c.bytes, (path.len() - shared) as u64);
        c.bytes.extend_from_slice(&path[shared..]);
        fields(&mut c.bytes);
        c.last.truncate(shared);
        c.last.extend_from_slice(&path[shared..]);
        c.left += 1;
        self.len += 1;
        self.bytes += c.bytes.len() - before;
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let c = self.chunks.front_mut()?;
        self.bytes += c.unseal();
        let e = Chunk::decode(&c.bytes, &mut c.at, &mut c.prev);
        c.left -= 1;
        self.len -= 1;
        if c.left == 0 {
            self.bytes -= c.bytes.len();
            self.chunks.pop_front();
        }
        Some(e)
    }

    /// Every entry, first to last, without taking them.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.chunks.iter().flat_map(|c| {
            let (mut at, mut prev) = (c.at, c.prev.clone());
            let bytes = c.entries();
            (0..c.left).map(move |_| Chunk::decode(&bytes, &mut at, &mut prev))
        })
    }

    /// Moves every entry of `other` behind this queue's.
    pub fn append(&mut self, other: &mut Self) {
        if other.is_empty() {
            return;
        }
        // From this list's last chunk (full now) on: what came raw from
        // a list that held less is deflated once this one holds enough
        // (the new last chunk may still grow).
        let from = self.chunks.len().saturating_sub(1);
        self.bytes += std::mem::take(&mut other.bytes);
        self.len += std::mem::take(&mut other.len);
        self.chunks.append(&mut other.chunks);
        if self.bytes >= self.deflate_after {
            let last = self.chunks.len() - 1;
            for c in self.chunks.range_mut(from..last) {
                self.bytes -= c.seal();
            }
        }
    }
}

impl<T: Record> Iterator for Packed<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len, Some(self.len))
    }
}

/// `n` Maildir message paths in path order, as a delivery agent names
/// them (times, a host, sizes, flags), `per_box` to a mailbox, alternating
/// between `cur` and `new` if `both`: what packing is measured on.
#[cfg(test)]
pub fn maildir_names(n: u64, per_box: u64, both: bool) -> Vec<String> {
    let mut names: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "user{:04}/Maildir/{}/{}.M{}P{}Q{i}.mx.example.net,S={}:2,S",
                i / per_box,
                if both && i % 2 == 1 { "new" } else { "cur" },
                1_700_000_000 + i * 7919 % 100_000,
                i * 104_729 % 1_000_000,
                i * 7_727 % 30_000,
                i * 65_537 % 3_000_000
            )
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A store number and a path, as the backlog holds them.
    #[derive(Debug, Clone, PartialEq)]
    struct P(u64, Vec<u8>);

    impl Record for P {
        fn path(&self) -> &[u8] {
            &self.1
        }
        fn put_fields(&self, out: &mut Vec<u8>) {
            put_uint(out, self.0);
        }
        fn unpack(path: &[u8], bytes: &[u8], at: &mut usize) -> Self {
            P(get_uint(bytes, at), path.to_vec())
        }
    }

    proptest! {
        /// Whatever goes in comes out, in order, byte-exact, as a plain
        /// queue would give it.
        #[test]
        fn a_packed_list_is_a_queue(
            deflate_after in prop_oneof![Just(0usize), Just(CHUNK_BYTES + 1), Just(usize::MAX)],
            ops in proptest::collection::vec(
                (0u8..4, any::<u64>(), proptest::collection::vec(1u8..=255, 0..300)),
                1..600,
            ),
        ) {
            let mut b = Packed::deflating_after(deflate_after);
            let mut other = Packed::deflating_after(deflate_after);
            let mut model: VecDeque<P> = VecDeque::new();
            let mut other_model: Vec<P> = Vec::new();
            let mut last = Vec::new();
            for (op, store, tail) in ops {
                // Paths that share beginnings, as a comparison's do.
                let mut raw = last.clone();
                raw.truncate(tail.len() % (last.len() + 1));
                raw.extend_from_slice(&tail);
                last = raw.clone();
                let p = P(store, raw);
                match op {
                    0 | 1 => {
                        b.push(&p);
                        model.push_back(p);
                    }
                    2 => prop_assert_eq!(b.pop_front(), model.pop_front()),
                    _ => {
                        other.push(&p);
                        other_model.push(p);
                        if other_model.len().is_multiple_of(7) {
                            b.append(&mut other);
                            model.extend(other_model.drain(..));
                            prop_assert!(other.is_empty());
                        }
                    }
                }
                prop_assert_eq!(b.len(), model.len());
                prop_assert!(b.iter().eq(model.iter().cloned()));
                let held: usize = b.chunks.iter().map(|c| c.bytes.len()).sum();
                prop_assert_eq!(b.held_bytes(), held);
            }
            while let Some(e) = b.pop_front() {
                prop_assert_eq!(Some(e), model.pop_front());
            }
            prop_assert!(model.is_empty() && b.is_empty());
        }

        #[test]
        fn numbers_come_back_as_they_went(u in any::<u64>(), i in any::<i64>()) {
            let mut out = Vec::new();
            put_uint(&mut out, u);
            put_int(&mut out, i);
            let mut at = 0;
            prop_assert_eq!(get_uint(&out, &mut at), u);
            prop_assert_eq!(get_int(&out, &mut at), i);
            prop_assert_eq!(at, out.len());
        }
    }

    /// A list's first [`DEFLATE_AFTER_BYTES`] stay as they are; the full
    /// chunks after them are deflated.
    #[test]
    fn only_chunks_past_the_first_megabytes_are_deflated() {
        let names = maildir_names(150_000, 100, true);
        let mut b = Packed::new();
        for (i, n) in names.iter().enumerate() {
            b.push(&P(i as u64, n.as_bytes().to_vec()));
        }
        let mut before = 0;
        let full = b.chunks.len() - 1;
        for (i, c) in b.chunks.iter().enumerate() {
            let raw = if c.packed_from == 0 {
                c.bytes.len()
            } else {
                c.packed_from
            };
            if before + raw <= DEFLATE_AFTER_BYTES {
                assert_eq!(
                    c.packed_from, 0,
                    "chunk {i} deflated within the first bytes"
                );
            } else if i < full {
                assert_ne!(c.packed_from, 0, "chunk {i} past the first bytes kept raw");
            }
            before += raw;
        }
        assert!(
            before > DEFLATE_AFTER_BYTES * 3 / 2,
            "{before} bytes pushed"
        );
        for (i, n) in names.iter().enumerate() {
            assert_eq!(b.pop_front(), Some(P(i as u64, n.as_bytes().to_vec())));
        }
    }

    #[test]
    fn an_entry_longer_than_a_chunk_is_kept_whole() {
        let mut b = Packed::new();
        let long = P(1, vec![b'x'; CHUNK_BYTES * 2]);
        for p in [P(0, b"a".to_vec()), long.clone(), P(0, b"b".to_vec())] {
            b.push(&p);
        }
        assert_eq!(b.pop_front(), Some(P(0, b"a".to_vec())));
        assert_eq!(b.pop_front(), Some(long));
        assert_eq!(b.pop_front(), Some(P(0, b"b".to_vec())));
        assert_eq!(b.pop_front(), None);
    }
}
