//! The manifest a replica sends for a comparison, listed a chunk at a time
//! from its index and its tree: the receiver sends each chunk before it
//! lists the next (a million-file manifest is never held whole), and the
//! data simulator lists its replica's tree with the same code.

use std::io;

use super::index::{self, Index, Rehash, Scan};
use super::tree::LocalTree;
use super::walk::{Ordered, Walk};
use super::Excludes;
use crate::wire::sync::ManifestEntry;

/// Encoded bytes of a manifest entry besides its path.
const ENTRY_FIXED_BYTES: usize = 2 + 1 + 8 + 24 + 16 + 8;
/// A chunk is sent once its entries reach this many bytes (the frame cap
/// is 8 MiB: 4,096 entries of 4 KiB paths would not fit one).
const CHUNK_BYTES_MAX: usize = 2 << 20;

/// How a manifest asked for finds its hashes: every file re-read from disk
/// while the replica is unverified (a flush failed: the page cache may hold
/// what the disk lost, under the same inode, size and times the index
/// vouches for), every file re-hashed for a full verification, else only
/// what changed since the index saw it.
pub fn rehash_for(unverified: bool, full_verify: bool) -> Rehash {
    if unverified {
        Rehash::FromDisk
    } else if full_verify {
        Rehash::All
    } else {
        Rehash::Changed
    }
}

/// A manifest being listed.
pub struct ManifestOut {
    id: u64,
    rehash: Rehash,
    /// Scans taken before the session (fresh ones), per store.
    pre: Vec<Option<Scan>>,
    /// The next store to list.
    next_store: usize,
    /// The store being listed and its entries not listed yet (walked as
    /// the chunks are made).
    current: Option<(usize, Ordered)>,
    /// Entries in a chunk at most.
    chunk_entries_max: usize,
}

impl ManifestOut {
    /// The manifest asked for as `id`: its hashes as `rehash` says, taken
    /// from `pre` for the stores scanned before (fresh scans).
    pub fn new(id: u64, rehash: Rehash, pre: Vec<Option<Scan>>, chunk_entries_max: usize) -> Self {
        ManifestOut {
            id,
            rehash,
            pre,
            next_store: 0,
            current: None,
            chunk_entries_max: chunk_entries_max.max(1),
        }
    }

    /// The request it answers.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn rehash(&self) -> Rehash {
        self.rehash
    }

    /// The store (of `stores`) the next chunk lists; `None` once every
    /// store was listed to its last chunk.
    pub fn store_due(&self, stores: usize) -> Option<usize> {
        match &self.current {
            Some((s, _)) => Some(*s),
            None => (self.next_store < stores).then_some(self.next_store),
        }
    }

    /// Lists the next chunk of the store `s` that [`ManifestOut::store_due`]
    /// named, from its tree and index (a store is walked as its turn
    /// comes), and whether it is the store's last. An error names the
    /// path; the manifest cannot go on.
    pub fn chunk<T: LocalTree + ?Sized>(
        &mut self,
        s: usize,
        tree: &T,
        index: &mut Index,
        excludes: &Excludes,
    ) -> io::Result<(Vec<ManifestEntry>, bool)> {
        let mut entries = match self.current.take() {
            Some((current, entries)) => {
                debug_assert_eq!(current, s, "the store due is listed");
                entries
            }
            None => {
                self.next_store = s + 1;
                match self.pre.get_mut(s).and_then(Option::take) {
                    Some(scan) => Ordered::held(scan),
                    None => Ordered::walk(Walk::new(index, self.rehash, true)),
                }
            }
        };
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0usize;
        // Within the entry count and well within the frame cap, however
        // long the paths.
        while chunk.len() < self.chunk_entries_max && chunk_bytes < CHUNK_BYTES_MAX {
            let Some((rel, st, hash)) = entries.next_if(tree, index, excludes, |_| true)? else {
                break;
            };
            let e = index::manifest_entry(&rel, &st, hash.unwrap_or(0));
            chunk_bytes += e.path.len() + ENTRY_FIXED_BYTES;
            chunk.push(e);
        }
        let last = entries.at_end(tree, index, excludes)?;
        if !last {
            self.current = Some((s, entries));
        }
        Ok((chunk, last))
    }
}
