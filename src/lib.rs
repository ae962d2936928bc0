//! hasync: keeps the mail data of an active-passive pair of mail appliances
//! in step, and makes failover lose no mail and create no duplicate.
//!
//! The public API for appliance code is [`Node`] (start a node in-process,
//! follow its role, commit, notify, status, shutdown) with [`Config`],
//! [`Role`] and [`Status`]. The modules below are the implementation
//! (public for the project's own tests, benches and fuzzers, hidden from
//! the documentation, and not covered by compatibility promises).
//!
//! Layers, from pure to glue: `model` (the mail-store types every layer
//! shares), `failover` (the sans-IO state core and its simulator), `wire`
//! (the strict codec), `config`, `io` (every file
//! operation, on tokio-uring, and all `unsafe`), `link` (the authenticated
//! heartbeat link), `replica` and `tracker` (replication), `queue` (the
//! failover push), `daemon` (the driver); `harness`, `demo`, `fixture` and
//! the simulators only with the cargo feature `tools` (on by default).

// `unsafe` lives in `io` only (each block with its `// SAFETY:` comment).
#![deny(unsafe_code)]

pub mod node;
pub use config::Config;
pub use daemon::control::Status;
pub use failover::Role;
pub use node::{Node, NodeError, RoleChange, Roles};

#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod daemon;
#[cfg(feature = "tools")]
#[doc(hidden)]
pub mod demo;
#[doc(hidden)]
pub mod failover;
#[doc(hidden)]
pub mod failpoint;
#[cfg(feature = "tools")]
#[doc(hidden)]
pub mod fixture;
#[cfg(feature = "tools")]
#[doc(hidden)]
pub mod harness;
#[doc(hidden)]
pub mod hooks;
#[doc(hidden)]
pub mod init;
#[doc(hidden)]
#[allow(unsafe_code)]
pub mod io;
#[cfg(feature = "etcd")]
#[doc(hidden)]
pub mod lease;
#[doc(hidden)]
pub mod link;
#[doc(hidden)]
pub mod logging;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod queue;
#[doc(hidden)]
pub mod quorum;
#[doc(hidden)]
pub mod replica;
#[doc(hidden)]
pub mod tracker;
#[doc(hidden)]
pub mod vip;
#[doc(hidden)]
pub mod wire;
