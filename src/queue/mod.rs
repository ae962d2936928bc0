//! Mail queue failover.

pub mod commit;
pub mod layout;
pub mod ledger;
pub mod push;
pub mod session;
#[cfg(any(test, feature = "tools"))]
pub mod sim;
