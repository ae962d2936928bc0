//! An appliance process that embeds one hasync node: it starts the node
//! from its configuration, starts and stops "the MTA" as the role changes,
//! and prints the node's status once serving.
//!
//!     cargo run --example embed -- /etc/hasync/hasync.toml
//!
//! Ctrl-C (or the node stopping) ends it.

use std::path::PathBuf;

use hasync::{Config, Node, Role};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/hasync/hasync.toml"));
    let node = Node::start(Config::load(&path)?)?;
    let mut roles = node.roles();
    let mut now = roles.current();
    loop {
        println!("role {} at epoch {} ({})", now.role, now.epoch, now.reason);
        match now.role {
            Role::Primary => {
                println!("  -> start the MTA");
                let s = node.status()?;
                println!(
                    "  peer {} {}, replication {}",
                    s.peer.name,
                    if s.peer.alive { "alive" } else { "not heard" },
                    s.replication.mode
                );
            }
            Role::Secondary | Role::Failed | Role::Off => println!("  -> stop the MTA"),
            _ => {}
        }
        match roles.wait_change() {
            Some(next) => now = next,
            None => break,
        }
    }
    node.shutdown()?;
    Ok(())
}
