//! The node's durable record (epoch file) in its state directory.

use std::path::{Path, PathBuf};

use crate::failover::EpochRecord;

pub const EPOCH_FILE: &str = "epoch.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); refusing to start with an unknown epoch. Restore it from the peer's value (hasync status on the peer shows it) or remove it only if this node must start from epoch 0")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Loads the record; a missing file means a node that never ran.
pub fn load(state_dir: &Path) -> Result<EpochRecord, StateError> {
    let path = state_dir.join(EPOCH_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EpochRecord::default()),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

/// The record in an epoch file's bytes; an error names `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<EpochRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

pub fn encode(rec: &EpochRecord) -> Vec<u8> {
    let mut v = serde_json::to_vec(rec).expect("EpochRecord serialises");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_epoch_zero_and_corrupt_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), EpochRecord::default());
        std::fs::write(d.path().join(EPOCH_FILE), b"{\"epoch\": 3, \"held_pri").unwrap();
        let err = load(d.path()).unwrap_err().to_string();
        assert!(
            err.contains("epoch.json") && err.contains("corrupt"),
            "{err}"
        );
        let rec = EpochRecord {
            epoch: 7,
            held_primary: Some(7),
        };
        std::fs::write(d.path().join(EPOCH_FILE), encode(&rec)).unwrap();
        assert_eq!(load(d.path()).unwrap(), rec);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn any_epoch_file_loads_or_is_refused_naming_the_file(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(EPOCH_FILE), &bytes).unwrap();
            if let Err(e) = load(d.path()) {
                proptest::prop_assert!(e.to_string().contains("epoch.json"));
            }
        }
    }
}
