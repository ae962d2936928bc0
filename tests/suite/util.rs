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

/// What a replica must reproduce of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    pub kind: &'static str,
    pub hash: u128,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files only: directory mtimes move with every landed entry.
    pub mtime_ns: Option<i128>,
    /// Other names of the same inode (hard links), sorted.
    pub links: Vec<String>,
}

/// Content hash, metadata and hard-link groups of a mailstore tree, leaving
/// out hasync's own directory and Maildir `tmp/` contents (not replicated).
pub fn digest(root: &Path) -> std::collections::BTreeMap<String, PathState> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::HashMap<u64, Vec<String>> = Default::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        // Trees are read while they may still change: skip what vanishes.
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let Ok(e) = e else { continue };
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".hasync" || rel.starts_with(".hasync/") {
                continue;
            }
            if p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n == "tmp")
            {
                continue;
            }
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let (kind, hash, mtime) = if md.is_dir() {
                stack.push(p.clone());
                ("dir", 0, None)
            } else if md.file_type().is_symlink() {
                let Ok(t) = std::fs::read_link(&p) else {
                    continue;
                };
                (
                    "symlink",
                    xxhash_rust::xxh3::xxh3_128(t.as_os_str().as_encoded_bytes()),
                    None,
                )
            } else {
                inodes.entry(md.ino()).or_default().push(rel.clone());
                let Ok(data) = std::fs::read(&p) else {
                    continue;
                };
                (
                    "file",
                    xxhash_rust::xxh3::xxh3_128(&data),
                    Some(md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128),
                )
            };
            out.insert(
                rel,
                PathState {
                    kind,
                    hash,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime_ns: mtime,
                    links: vec![],
                },
            );
        }
    }
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        let mut sorted = names.clone();
        sorted.sort();
        for n in &names {
            out.get_mut(n).unwrap().links = sorted.clone();
        }
    }
    out
}

/// Describes how two digests differ (first few paths).
pub fn diff(
    a: &std::collections::BTreeMap<String, PathState>,
    b: &std::collections::BTreeMap<String, PathState>,
) -> String {
    let mut lines = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => lines.push(format!("only on primary: {k}")),
            Some(w) if w != v => lines.push(format!("differs: {k}: {v:?} vs {w:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            lines.push(format!("only on secondary: {k}"));
        }
    }
    let n = lines.len();
    lines.truncate(12);
    format!("{n} differences:\n{}", lines.join("\n"))
}

/// Waits until both mailstore trees are identical; returns how long it took.
pub fn wait_identical(a: &Path, b: &Path, timeout: Duration) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        let (da, db) = (digest(a), digest(b));
        if da == db {
            return Ok(start.elapsed());
        }
        last = diff(&da, &db);
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("trees not identical after {timeout:?}: {last}"))
}

/// Serialises the window in which a test lowers the kernel's inotify queue
/// limit (a global sysctl) against other tests starting trackers.
pub static INOTIFY_LIMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn inotify_guard() -> std::sync::MutexGuard<'static, ()> {
    INOTIFY_LIMIT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small Maildir fixture.
pub fn spec(seed: u64, mailboxes: usize, messages: usize) -> hasync::fixture::MaildirSpec {
    hasync::fixture::MaildirSpec {
        seed,
        mailboxes,
        messages,
        median_size: 4 * 1024,
        min_size: 0,
        max_size: 256 * 1024,
    }
}

impl TestPair {
    /// Root of mailstore `name` on node `i`.
    pub fn store(&self, i: usize, name: &str) -> PathBuf {
        self.pair.nodes[i]
            .mailstores
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .clone()
    }

    pub fn repl(&self, i: usize) -> hasync::replica::stats::ReplStatus {
        self.pair.nodes[i].status().unwrap().replication
    }
}
