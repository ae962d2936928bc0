//! Mail queue failover.

pub mod layout;
pub mod ledger;
pub mod push;
pub mod session;
