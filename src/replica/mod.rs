//! Mailstore replication.

pub mod fsops;
