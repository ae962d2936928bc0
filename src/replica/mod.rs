//! Continuous mailstore replication: the primary's sender streams changes
//! found by the tracker to the secondary's receiver over the sync connection,
//! which lands every file atomically and durably and acknowledges batches.

pub mod commit;
pub mod commit_sim;
pub mod conflicts;
pub mod dovecot;
pub mod drift;
pub mod engine;
pub mod fence;
pub mod foreign;
pub mod fsops;
pub mod index;
pub mod links;
pub mod receiver;
pub use receiver::Durability;
pub mod sender;
pub mod space;
pub mod stager;
pub mod stats;
pub mod takeover;
pub mod tree;

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

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
