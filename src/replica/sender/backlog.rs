//! Paths waiting to be sent: a comparison with an empty replica queues
//! every path of the store (a million, say) before the coalescer takes
//! them a few batches at a time. They are held packed (see
//! [`crate::replica::packed`]): about 20 bytes a Maildir path.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::replica::packed::{get_uint, put_uint, Packed, Record};

/// A queue of `(store, path)`, first in first out.
#[derive(Debug, Default)]
pub struct Backlog(Packed<(usize, PathBuf)>);

impl Record for (usize, PathBuf) {
    fn path(&self) -> &[u8] {
        self.1.as_os_str().as_bytes()
    }
    fn put_fields(&self, out: &mut Vec<u8>) {
        put_uint(out, self.0 as u64);
    }
    fn unpack(path: &[u8], bytes: &[u8], at: &mut usize) -> Self {
        let store = get_uint(bytes, at) as usize;
        (store, PathBuf::from(OsStr::from_bytes(path)))
    }
}

impl Backlog {
    pub fn new() -> Backlog {
        Backlog::default()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn push(&mut self, store: usize, rel: &Path) {
        self.0.push_with(rel.as_os_str().as_bytes(), |out| {
            put_uint(out, store as u64)
        });
    }

    pub fn pop_front(&mut self) -> Option<(usize, PathBuf)> {
        self.0.pop_front()
    }

    /// Every entry, first to last, without taking them.
    pub fn iter(&self) -> impl Iterator<Item = (usize, PathBuf)> + '_ {
        self.0.iter()
    }

    /// Moves every entry of `other` behind this queue's.
    pub fn append(&mut self, other: &mut Backlog) {
        self.0.append(&mut other.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maildir names as a comparison queues them, deflated: a path then
    /// holds less than a third of what it would unpacked.
    #[test]
    fn full_chunks_of_maildir_names_are_deflated() {
        let paths: Vec<PathBuf> = crate::replica::packed::maildir_names(20_000, 100, false)
            .into_iter()
            .map(PathBuf::from)
            .collect();
        let mut b = Backlog(Packed::deflating_after(0));
        for p in &paths {
            b.push(0, p);
        }
        let raw: usize = paths.iter().map(|p| p.as_os_str().len()).sum();
        let held = b.0.held_bytes();
        assert!(held * 3 < raw, "{held} bytes held for {raw} bytes of paths");
        assert!(b.iter().map(|(_, p)| p).eq(paths.iter().cloned()));
        for p in &paths {
            assert_eq!(b.pop_front(), Some((0, p.clone())));
        }
        assert!(b.is_empty() && b.0.held_bytes() == 0);
    }

    #[test]
    fn stores_and_paths_come_back_byte_exact() {
        let mut b = Backlog::new();
        let odd = PathBuf::from(OsStr::from_bytes(b"a/\xff\xfe/new/1"));
        b.push(3, &odd);
        b.push(usize::MAX, Path::new("a/é/cur/2"));
        let mut more = Backlog::new();
        more.push(0, Path::new("b"));
        b.append(&mut more);
        assert!(more.is_empty());
        assert_eq!(b.len(), 3);
        assert_eq!(b.pop_front(), Some((3, odd)));
        assert_eq!(
            b.pop_front(),
            Some((usize::MAX, PathBuf::from("a/é/cur/2")))
        );
        assert_eq!(b.pop_front(), Some((0, PathBuf::from("b"))));
        assert!(b.pop_front().is_none() && b.is_empty());
    }
}
