mod cli;
mod failover_props;
mod hostile;
mod pair;
mod queue;
mod replication;
mod util;
