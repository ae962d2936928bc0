mod cli;
mod failover_props;
mod flood;
mod hostile;
mod pair;
mod queue;
mod replication;
mod util;
