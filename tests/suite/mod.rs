mod cli;
mod edges;
mod failover_props;
mod flood;
pub mod hostile;
mod pair;
mod queue;
mod replication;
mod util;
