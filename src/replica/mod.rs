//! Continuous mailstore replication: the primary's sender streams changes
//! found by the tracker to the secondary's receiver over the sync connection,
//! which lands every file atomically and durably and acknowledges batches.

pub mod apply;
pub mod commit;
#[cfg(any(test, feature = "tools"))]
pub mod commit_sim;
pub mod conflicts;
#[cfg(any(test, feature = "tools"))]
pub mod data_sim;
pub mod dovecot;
pub mod drift;
pub mod engine;
pub mod fence;
pub mod fill;
pub mod foreign;
pub mod fsops;
pub mod gate;
pub mod handover;
pub mod held;
pub mod index;
pub mod latch;
pub mod links;
pub mod manifest;
pub mod packed;
pub mod receiver;
pub mod reception;
pub mod sender;
pub mod space;
pub mod stager;
pub mod stats;
pub mod takeover;
pub mod tenure;
pub mod tree;
pub mod waiters;
pub mod waiting;
pub mod walk;
pub mod warm;
pub mod window;

pub use crate::model::{moved_path, Durability, Excludes};
