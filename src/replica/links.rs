//! The sender's record of hard links: for an inode, the names the replica
//! holds (or will hold, ops applying there in order) with that inode, so
//! that another name of it travels as a link instead of a copy.
//!
//! Every name is kept until it stops being true: deleted, renamed away,
//! replaced, or refused by the peer. A single name per inode is not enough:
//! when the name on record is deleted, a later link must go to one of the
//! names that remain, or it would travel as a copy and split the inode on
//! the replica for good (a comparison of contents never notices).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::index::Version;

/// (device, inode number) on the primary.
pub type InodeKey = (u64, u64);

/// One name of an inode in one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    pub store: usize,
    pub path: PathBuf,
    /// The inode as it was when this name was sent.
    pub version: Version,
}

/// A message copied into a few folders has a few names; past this many the
/// oldest is dropped (any one of them is enough to link to).
const NAMES_PER_INODE: usize = 4;

#[derive(Debug, Default)]
pub struct LinkNames {
    map: HashMap<InodeKey, Vec<Name>>,
}

impl LinkNames {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// `path` is (or will be) a name of `key` on the replica.
    pub fn record(&mut self, key: InodeKey, store: usize, path: &Path, version: Version) {
        let names = self.map.entry(key).or_default();
        names.retain(|n| !(n.store == store && n.path == path));
        names.push(Name {
            store,
            path: path.to_path_buf(),
            version,
        });
        if names.len() > NAMES_PER_INODE {
            names.remove(0);
        }
    }

    /// The newest recorded name of `key` in `store` other than `rel`.
    pub fn other_name(&self, key: InodeKey, store: usize, rel: &Path) -> Option<&Name> {
        self.map
            .get(&key)?
            .iter()
            .rev()
            .find(|n| n.store == store && n.path != rel)
    }

    /// Every recorded name of `key` in `store`.
    pub fn names(&self, key: InodeKey, store: usize) -> impl Iterator<Item = &Path> {
        self.map
            .get(&key)
            .into_iter()
            .flatten()
            .filter(move |n| n.store == store)
            .map(|n| n.path.as_path())
    }

    /// The recorded names of `store` directly in folder `dir`.
    pub fn in_folder(&self, store: usize, dir: &Path) -> Vec<(InodeKey, PathBuf)> {
        let mut names: Vec<(InodeKey, PathBuf)> = self
            .map
            .iter()
            .flat_map(|(k, names)| names.iter().map(move |n| (*k, n)))
            .filter(|(_, n)| n.store == store && n.path.parent() == Some(dir))
            .map(|(k, n)| (k, n.path.clone()))
            .collect();
        // In name order, not the map's (which differs from run to run).
        names.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        names
    }

    /// The inode changed: none of its names holds this content any more.
    pub fn forget_inode(&mut self, key: InodeKey) {
        self.map.remove(&key);
    }

    /// One name of one inode is not (or no longer) on the replica.
    pub fn forget_name(&mut self, key: InodeKey, store: usize, path: &Path) {
        if let Some(names) = self.map.get_mut(&key) {
            names.retain(|n| !(n.store == store && n.path == path));
            if names.is_empty() {
                self.map.remove(&key);
            }
        }
    }

    /// Every name at or under `rel` is gone (deleted, or replaced), except
    /// names of `keep` (the inode that now holds `rel`, if any).
    pub fn forget_under(&mut self, store: usize, rel: &Path, keep: Option<InodeKey>) {
        self.map.retain(|k, names| {
            if Some(*k) != keep {
                names.retain(|n| n.store != store || !n.path.starts_with(rel));
            }
            !names.is_empty()
        });
    }

    /// Forgets these exact names of `store` (one pass over the record,
    /// however many names).
    pub fn forget_names(&mut self, store: usize, names: &std::collections::HashSet<PathBuf>) {
        if names.is_empty() {
            return;
        }
        self.map.retain(|_, kept| {
            kept.retain(|n| n.store != store || !names.contains(&n.path));
            !kept.is_empty()
        });
    }

    /// `from` was renamed to `to`: what `to` held is replaced, and the names
    /// at or under `from` move.
    pub fn renamed(&mut self, store: usize, from: &Path, to: &Path) {
        self.forget_under(store, to, None);
        for names in self.map.values_mut() {
            for n in names.iter_mut().filter(|n| n.store == store) {
                if let Ok(rest) = n.path.strip_prefix(from) {
                    n.path = if rest.as_os_str().is_empty() {
                        to.to_path_buf()
                    } else {
                        to.join(rest)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ino: u64) -> Version {
        Version::sample(ino)
    }

    const K: InodeKey = (1, 7);

    fn other(l: &LinkNames, rel: &str) -> Option<String> {
        l.other_name(K, 0, Path::new(rel))
            .map(|n| n.path.display().to_string())
    }

    #[test]
    fn a_deleted_name_leaves_the_others_to_link_to() {
        let mut l = LinkNames::default();
        l.record(K, 0, Path::new("a"), v(7));
        l.record(K, 0, Path::new("b"), v(7));
        assert_eq!(other(&l, "c").as_deref(), Some("b"), "newest first");
        l.forget_under(0, Path::new("b"), None);
        assert_eq!(other(&l, "c").as_deref(), Some("a"));
        l.forget_under(0, Path::new("a"), None);
        assert_eq!(other(&l, "c"), None);
        assert!(l.is_empty(), "an inode without names is dropped");
    }

    #[test]
    fn names_found_not_held_are_forgotten_in_their_store_only() {
        let mut l = LinkNames::default();
        l.record(K, 0, Path::new("a"), v(7));
        l.record(K, 0, Path::new("b"), v(7));
        l.record(K, 1, Path::new("b"), v(7));
        let gone: std::collections::HashSet<PathBuf> = [PathBuf::from("b")].into();
        l.forget_names(0, &gone);
        assert_eq!(other(&l, "c").as_deref(), Some("a"));
        l.forget_names(0, &[PathBuf::from("a")].into());
        assert_eq!(other(&l, "c"), None);
        assert!(!l.is_empty(), "store 1's name stays");
    }

    #[test]
    fn the_name_asked_for_is_never_its_own_source() {
        let mut l = LinkNames::default();
        l.record(K, 0, Path::new("a"), v(7));
        assert_eq!(other(&l, "a"), None);
        l.record(K, 1, Path::new("b"), v(7));
        assert_eq!(other(&l, "a"), None, "a name in another store is no source");
    }

    #[test]
    fn renames_move_names_and_replace_what_the_target_held() {
        let mut l = LinkNames::default();
        l.record(K, 0, Path::new("box/new/m"), v(7));
        l.record((1, 8), 0, Path::new("box/cur/m:2,S"), v(8));
        // Flag rename over another message's name: that one is gone.
        l.renamed(0, Path::new("box/new/m"), Path::new("box/cur/m:2,S"));
        assert_eq!(other(&l, "x").as_deref(), Some("box/cur/m:2,S"));
        assert!(l.other_name((1, 8), 0, Path::new("x")).is_none());
        // A folder rename moves what is under it, not look-alike prefixes.
        l.record(K, 0, Path::new("boxes/m"), v(7));
        l.renamed(0, Path::new("box"), Path::new("Archive"));
        let names: Vec<_> = l.map[&K].iter().map(|n| n.path.clone()).collect();
        assert_eq!(
            names,
            [PathBuf::from("Archive/cur/m:2,S"), PathBuf::from("boxes/m")]
        );
    }

    #[test]
    fn a_reused_name_keeps_only_its_new_inode() {
        let mut l = LinkNames::default();
        l.record(K, 0, Path::new("m"), v(7));
        l.record((1, 9), 0, Path::new("m"), v(9));
        l.forget_under(0, Path::new("m"), Some((1, 9)));
        assert!(l.other_name(K, 0, Path::new("x")).is_none());
        assert!(l.other_name((1, 9), 0, Path::new("x")).is_some());
    }

    #[test]
    fn names_are_bounded_and_one_can_be_forgotten() {
        let mut l = LinkNames::default();
        for i in 0..10 {
            l.record(K, 0, Path::new(&format!("n{i}")), v(7));
        }
        assert_eq!(l.map[&K].len(), NAMES_PER_INODE);
        l.record(K, 0, Path::new("n9"), v(7));
        assert_eq!(l.map[&K].len(), NAMES_PER_INODE, "no duplicates");
        l.forget_name(K, 0, Path::new("n9"));
        assert_eq!(other(&l, "x").as_deref(), Some("n8"));
        l.forget_inode(K);
        assert_eq!(l.len(), 0);
    }
}
