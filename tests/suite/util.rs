//! Fixture helpers: real daemons in temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub use hasync::failover::Role;
pub use hasync::harness::{Pair, PairOptions, LOG_WAIT};

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

    /// Starts both nodes and waits for the pair, the secondary's first
    /// sync finished; returns the primary's index.
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

    /// Both logs once `pred` holds of them together, or as they stand
    /// after [`hasync::harness::LOG_WAIT`].
    pub fn logs_when(&self, pred: impl Fn(&str) -> bool) -> String {
        let mut log = self.logs();
        let deadline = std::time::Instant::now() + hasync::harness::LOG_WAIT;
        while !pred(&log) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            log = self.logs();
        }
        log
    }

    pub fn logs(&self) -> String {
        format!(
            "--- mx1 log ---\n{}\n--- mx2 log ---\n{}",
            self.pair.nodes[0].log(),
            self.pair.nodes[1].log()
        )
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

pub use hasync::fixture::{digest, PathState};

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

pub fn inotify_guard() -> InotifyGuard {
    let mutex = INOTIFY_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    // The sysctl is global: two test processes (two clones, a second
    // `cargo test`) must not interleave either.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("hasync-test-inotify-limit.lock"))
        .unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
    InotifyGuard {
        _file: file,
        _mutex: mutex,
    }
}

/// Held while a tracker starts or while the inotify limit is lowered; the
/// file lock is released when the file closes.
pub struct InotifyGuard {
    _file: std::fs::File,
    _mutex: std::sync::MutexGuard<'static, ()>,
}

/// A small Maildir fixture; its few big messages (up to 3 MiB) take the
/// large-file path (over 256 KiB: streamed, spliced by default).
pub fn spec(seed: u64, mailboxes: usize, messages: usize) -> hasync::fixture::MaildirSpec {
    hasync::fixture::MaildirSpec {
        seed,
        mailboxes,
        messages,
        median_size: 4 * 1024,
        min_size: 0,
        max_size: 3 << 20,
    }
}

impl TestPair {
    /// Kills the sync connection into node `i`, the secondary (`ss -K` on
    /// its sync port; `-n`, or a port that is also a service's in
    /// /etc/services, such as 30865, is printed by name and the kill looks
    /// missed).
    pub fn cut_sync_connection(&self, i: usize) {
        let config = std::fs::read_to_string(&self.pair.nodes[i].config_path).unwrap();
        let port = config
            .lines()
            .find_map(|l| l.strip_prefix("sync_listen = \""))
            .and_then(|a| a.trim_end_matches('"').rsplit(':').next())
            .expect("sync_listen in the configuration")
            .to_string();
        let out = Command::new("ss")
            .args([
                "-K",
                "-t",
                "-n",
                "(",
                "sport",
                "=",
                &format!(":{port}"),
                ")",
            ])
            .output()
            .expect("ss");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!(":{port}")),
            "no sync connection killed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// The versions kept aside on node `i` (`hasync conflicts list`; empty
    /// if the node does not answer).
    pub fn conflicts(&self, i: usize) -> Vec<hasync::replica::conflicts::Conflict> {
        self.pair.nodes[i]
            .request(&hasync::daemon::control::Request::Conflicts)
            .ok()
            .and_then(|r| r.conflicts)
            .unwrap_or_default()
    }

    /// Waits until node 0 lists `on0` kept-aside versions and node 1
    /// `on1`; panics with both lists and the logs after `limit`.
    pub fn wait_conflicts(&self, on0: usize, on1: usize, limit: Duration) {
        let start = std::time::Instant::now();
        while self.conflicts(0).len() != on0 || self.conflicts(1).len() != on1 {
            assert!(
                start.elapsed() < limit,
                "not {on0} / {on1} versions kept aside: {:?} / {:?}\n{}",
                self.conflicts(0),
                self.conflicts(1),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The content of `c`, kept aside in node `i`'s inbox store.
    pub fn conflict_body(&self, i: usize, c: &hasync::replica::conflicts::Conflict) -> Vec<u8> {
        let file = self.pair.nodes[i]
            .state_dir
            .join("internal/inbox/conflicts")
            .join(c.id.split_once('/').unwrap().1);
        std::fs::read(file).unwrap_or_default()
    }

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

    /// Waits until node `i`'s tracker has its watches (hold the inotify
    /// guard until then: the queue limit is read when it starts).
    pub fn wait_tracking(&self, i: usize) {
        self.pair.nodes[i]
            .wait_status(Duration::from_secs(10), Duration::from_millis(20), |s| {
                s.replication.watches > 0
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Waits until node `i` is in `role`; its status then.
    pub fn wait_mode(&self, i: usize, role: Role, timeout: Duration) -> hasync::Status {
        self.pair.nodes[i]
            .wait_status(timeout, Duration::from_millis(10), |s| s.mode == role)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    pub fn repl(&self, i: usize) -> hasync::replica::stats::ReplStatus {
        self.pair.nodes[i].status().unwrap().replication
    }
}

/// Unmounts (lazily) when dropped.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a tmpfs with `options` (e.g. `size=1m,nr_inodes=64`) over `dir`
/// (the tests run as root).
pub fn mount_tmpfs(dir: &Path, options: &str) -> Unmount {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a small tmpfs needs root");
    Unmount(dir.to_path_buf())
}

/// Fills the filesystem holding `dir` (a file `fill` of everything that
/// fits); remove the file to give the space back.
pub fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("fill");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    p
}

/// Fills the stopped secondary's disk whose store is `dir`, once the files
/// its receiver had staged when it stopped are gone: a restart removes the
/// leftovers first, and a killed process's io_uring releases the staged
/// files it held open some time after the process is reaped. The room
/// either gave back would let what the test sends land. Tops the fill up
/// until three rounds 300 ms apart find no more room.
pub fn fill_up_after_staged_leftovers(dir: &Path) -> PathBuf {
    use std::io::Write;
    if let Ok(staged) = std::fs::read_dir(dir.join(".hasync-inbox/staging")) {
        for e in staged.flatten() {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    let p = fill_up(dir);
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    let chunk = vec![0u8; 4096];
    let mut quiet = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        let mut wrote = false;
        while f.write_all(&chunk).is_ok() {
            wrote = true;
        }
        let _ = f.sync_all();
        quiet = if wrote { 0 } else { quiet + 1 };
        if quiet == 3 {
            break;
        }
    }
    p
}

/// Restarts node `i` with its takeover-record walk stretched to `ms`
/// (`HASYNC_FAILPOINT_TAKEOVER_WALK_MS`), and waits for the pair to form
/// again around the other node as primary.
pub fn restart_with_a_slow_takeover_walk(tp: &mut TestPair, i: usize, ms: u64) {
    tp.nodes[i].kill9().unwrap();
    tp.nodes[i]
        .start_with_env(&[("HASYNC_FAILPOINT_TAKEOVER_WALK_MS", &ms.to_string())])
        .unwrap();
    assert_eq!(
        tp.wait_formed(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs())),
        1 - i
    );
}
