mod cli;
mod failover_props;
mod hostile;
mod pair;
mod replication;
mod util;
