//! hasync: keeps the mail data of an active-passive pair of mail appliances
//! in step, and makes failover lose no mail and create no duplicate.
//!
//! Layers, from pure to glue:
//! - [`failover`]: the sans-IO failover state core (and its simulator);
//! - [`wire`]: the strict link codec;
//! - [`config`]: configuration parsing and validation;
//! - [`io`]: every file operation, on tokio-uring;
//! - [`link`]: the authenticated heartbeat link;
//! - [`daemon`]: the driver that runs the core against real sockets and files;
//! - [`harness`] and [`demo`]: real-process pairs for the demo and tests.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod failover;
pub mod failpoint;
pub mod fixture;
pub mod harness;
pub mod hooks;
pub mod init;
pub mod io;
#[cfg(feature = "etcd")]
pub mod lease;
pub mod link;
pub mod logging;
pub mod queue;
pub mod quorum;
pub mod replica;
pub mod tracker;
pub mod vip;
pub mod wire;
