//! The mail-store model every layer shares: file metadata, the durability
//! mode, which paths are replicated. The ground floor: it depends on
//! nothing else in the crate; the wire encodes these types, the
//! configuration names them, the replica uses them.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// File metadata that mail software depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

/// The order of [`Path`]'s `Ord` (component by component) for the
/// normalized relative paths the replica deals in (names joined by single
/// `/`, no `.` or `..`, no trailing `/`), computed on the bytes: at the
/// first byte where two paths differ, a `/` (the end of a component) sorts
/// below any byte of a name. Sorting tens of thousands of paths this way
/// costs a fraction of comparing their components.
pub fn path_order(a: &Path, b: &Path) -> std::cmp::Ordering {
    use std::os::unix::ffi::OsStrExt;
    let (a, b) = (a.as_os_str().as_bytes(), b.as_os_str().as_bytes());
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => a.len().cmp(&b.len()),
        Some(i) => {
            let rank = |c: u8| if c == b'/' { 0 } else { u16::from(c) + 1 };
            rank(a[i]).cmp(&rank(b[i]))
        }
    }
}

/// `p` after a rename of `from` to `to`: `None` unless `p` is `from` or
/// below it.
pub fn moved_path(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

/// How a commit makes staged files and directory changes durable
/// (`[replication] durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// One syncfs before the renames and one after: the fewest disk flushes
    /// for any batch size (measured fastest here). It also writes back every
    /// other dirty file of the replica's filesystem.
    #[default]
    Syncfs,
    /// Each staged file fsynced through io_uring as soon as it is complete
    /// (overlapping the rest of the batch), then the renames, then an fsync
    /// of each touched directory: for a replica that shares its filesystem
    /// with other busy writers, whose dirty data a syncfs would flush too.
    Fsync,
}

/// Paths (relative to a store root) that are not replicated.
#[derive(Debug, Clone)]
pub struct Excludes {
    set: GlobSet,
}

impl Excludes {
    /// Patterns were validated with the configuration.
    pub fn new(patterns: &[String]) -> Result<Excludes, globset::Error> {
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(GlobBuilder::new(p).literal_separator(true).build()?);
        }
        Ok(Excludes { set: b.build()? })
    }

    pub fn is_excluded(&self, rel: &Path) -> bool {
        self.set.is_match(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// `path_order` is `Path`'s own order on the paths it is used for.
        #[test]
        fn path_order_is_paths_component_order(
            a in proptest::collection::vec("[a-c.,/\\-]{1,3}|[\\x{1}-\\x{ff}]{1,2}", 1..4),
            b in proptest::collection::vec("[a-c.,/\\-]{1,3}|[\\x{1}-\\x{ff}]{1,2}", 1..4),
        ) {
            let norm = |v: &Vec<String>| -> PathBuf {
                v.iter()
                    .flat_map(|c| c.split('/'))
                    .filter(|c| !c.is_empty() && *c != "." && *c != "..")
                    .collect()
            };
            let (a, b) = (norm(&a), norm(&b));
            proptest::prop_assert_eq!(path_order(&a, &b), a.cmp(&b), "{:?} vs {:?}", a, b);
        }
    }

    #[test]
    fn path_order_puts_a_folders_entries_before_its_longer_named_siblings() {
        let mut v = vec![
            Path::new("a-b"),
            Path::new("a/b"),
            Path::new("a"),
            Path::new("a.b/c"),
        ];
        v.sort_by(|x, y| path_order(x, y));
        assert_eq!(
            v,
            [
                Path::new("a"),
                Path::new("a/b"),
                Path::new("a-b"),
                Path::new("a.b/c")
            ]
        );
    }

    #[test]
    fn maildir_tmp_is_excluded_and_a_hasync_folder_is_mail() {
        let e = Excludes::new(&["**/tmp/*".to_string()]).unwrap();
        assert!(e.is_excluded(Path::new("user/Maildir/tmp/123.host")));
        assert!(e.is_excluded(Path::new("tmp/123.host")));
        assert!(!e.is_excluded(Path::new("user/Maildir/tmp")));
        assert!(!e.is_excluded(Path::new("user/Maildir/new/123.host")));
        // hasync's own files live outside the stores: a Maildir++ folder
        // named "hasync" is mail like any other.
        assert!(!e.is_excluded(Path::new(".hasync/cur/1")));
        assert!(!e.is_excluded(Path::new("a/.hasync")));
    }
}
