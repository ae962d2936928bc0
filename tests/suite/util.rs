//! Fixture helpers: real daemons in temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub use hasync::failover::Role;
pub use hasync::harness::{Pair, PairOptions};

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hasync"))
}

/// Fast timings so that the suite stays quick: 100 ms heartbeats, lost after 5.
pub fn fast() -> PairOptions {
    PairOptions {
        heartbeat_interval_ms: 100,
        heartbeat_lost_threshold: 5,
        startup_wait_ms: 1500,
        ..PairOptions::default()
    }
}

pub struct TestPair {
    pub pair: Pair,
    // Held for its Drop: the directory outlives the daemons.
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestPair {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

impl std::ops::DerefMut for TestPair {
    fn deref_mut(&mut self) -> &mut Pair {
        &mut self.pair
    }
}

impl TestPair {
    pub fn new(options: PairOptions) -> TestPair {
        let dir = tempfile::Builder::new()
            .prefix("hasync-test-")
            .tempdir()
            .unwrap();
        let pair = Pair::create(&exe(), dir.path(), options).unwrap();
        TestPair { pair, _dir: dir }
    }

    pub fn start_all(&mut self) {
        for n in self.pair.nodes.iter_mut() {
            n.start().unwrap();
        }
    }

    /// Starts both nodes and waits for the pair; returns the primary's index.
    pub fn formed(options: PairOptions) -> (TestPair, usize) {
        let mut tp = TestPair::new(options);
        tp.start_all();
        let p = tp.wait_formed(Duration::from_secs(20)).unwrap_or_else(|e| {
            panic!(
                "{e}\n--- mx1 log ---\n{}\n--- mx2 log ---\n{}",
                tp.nodes[0].log(),
                tp.nodes[1].log()
            )
        });
        (tp, p)
    }

    pub fn logs(&self) -> String {
        format!(
            "--- mx1 log ---\n{}\n--- mx2 log ---\n{}",
            self.pair.nodes[0].log(),
            self.pair.nodes[1].log()
        )
    }
}

/// Runs the hasync binary with `args`.
pub fn hasync(args: &[&str]) -> Output {
    Command::new(exe()).args(args).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn write(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
}
