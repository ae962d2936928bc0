//! Crash points for tests: `HASYNC_FAILPOINTS="name=N,..."` makes the
//! process abort (no destructors, no flushes: like `kill -9`) the N-th time
//! it reaches `hit("name")`, or makes the N-th `fails("name")` true (an
//! injected I/O error, e.g. `syncfs.eio`); `name=N+` makes every
//! `fails("name")` from the N-th on true (a failure that lasts). Unset, a
//! hit costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// An armed point: the reach it is due at, whether it stays due after
/// (`N+`), and how often it was reached.
struct Point {
    at: u64,
    lasting: bool,
    count: AtomicU64,
}

static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

fn points() -> &'static HashMap<String, Point> {
    POINTS.get_or_init(|| {
        let mut m = HashMap::new();
        if let Ok(spec) = std::env::var("HASYNC_FAILPOINTS") {
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, n) = item.split_once('=').unwrap_or((item, "1"));
                let (n, lasting) = match n.strip_suffix('+') {
                    Some(n) => (n, true),
                    None => (n, false),
                };
                let point = Point {
                    at: n.parse().unwrap_or(1),
                    lasting,
                    count: AtomicU64::new(0),
                };
                m.insert(name.to_string(), point);
            }
        }
        m
    })
}

/// Whether the error point `name` is armed and due (`name=N`: the N-th
/// time it is reached; `name=N+`: from then on); the caller then fails as
/// the real call would.
pub fn fails(name: &str) -> bool {
    points().get(name).is_some_and(|p| {
        let n = p.count.fetch_add(1, Ordering::SeqCst) + 1;
        n == p.at || (p.lasting && n > p.at)
    })
}

/// Aborts the process if the failpoint `name` is armed and due.
pub fn hit(name: &str) {
    if let Some(p) = points().get(name) {
        if p.count.fetch_add(1, Ordering::SeqCst) + 1 == p.at {
            eprintln!("hasync: failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}

/// A test's shorter wait, `HASYNC_FAILPOINT_<NAME>_MS` (e.g. `ACK_WAIT`),
/// else `default`: a daemon test cannot wait out a production timer.
pub fn wait_or(name: &str, default: std::time::Duration) -> std::time::Duration {
    std::env::var(format!("HASYNC_FAILPOINT_{name}_MS"))
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, std::time::Duration::from_millis)
}
