mod cli;
mod failover_props;
mod pair;
mod util;
