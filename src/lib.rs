pub mod config;
pub mod failover;
pub mod link;
pub mod wire;
