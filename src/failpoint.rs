//! Crash points for tests: `HASYNC_FAILPOINTS="name=N,..."` makes the
//! process abort (no destructors, no flushes: like `kill -9`) the N-th time
//! it reaches `hit("name")`. Unset, a hit costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static POINTS: OnceLock<HashMap<String, (u64, AtomicU64)>> = OnceLock::new();

fn points() -> &'static HashMap<String, (u64, AtomicU64)> {
    POINTS.get_or_init(|| {
        let mut m = HashMap::new();
        if let Ok(spec) = std::env::var("HASYNC_FAILPOINTS") {
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, n) = item.split_once('=').unwrap_or((item, "1"));
                let n = n.parse().unwrap_or(1);
                m.insert(name.to_string(), (n, AtomicU64::new(0)));
            }
        }
        m
    })
}

/// Aborts the process if the failpoint `name` is armed and due.
pub fn hit(name: &str) {
    if let Some((at, count)) = points().get(name) {
        if count.fetch_add(1, Ordering::SeqCst) + 1 == *at {
            eprintln!("hasync: failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}
