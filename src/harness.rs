//! Starts real `hasync` daemons in temporary directories: used by
//! `hasync demo` and by the integration tests, so both run the same scenario
//! code against real processes.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::control::{self, Request, Response, Status};

/// How long [`NodeProc::log_shows`] waits for a record to reach the log.
pub const LOG_WAIT: Duration = Duration::from_secs(10);

/// Settings shared by both nodes of a test pair.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub heartbeat_interval_ms: u64,
    pub heartbeat_lost_threshold: u32,
    pub startup_wait_ms: u64,
    pub recovery: &'static str,
    pub priorities: [u8; 2],
    /// Anti-entropy interval of the replication.
    pub verify_interval_ms: u64,
    /// `replication.durability` of both nodes.
    pub durability: &'static str,
    /// `replication.flush_alarm_ms` of both nodes.
    pub flush_alarm_ms: u64,
    /// `replication.zero_copy` of both nodes.
    pub zero_copy: bool,
    /// `replication.watch_foreign_writes` of both nodes.
    pub watch_foreign_writes: bool,
    /// `queue.layout` of both nodes.
    pub queue_layout: &'static str,
    /// `queue.sync` of both nodes.
    pub queue_sync: &'static str,
    /// `queue.sync_interval_ms` (periodic queue sync).
    pub queue_sync_interval_ms: u64,
    /// hasync's internal directories beside the stores (`mail/.hasync-<store>`,
    /// `queue-internal`) instead of under `state_dir`: for tests that mount a
    /// filesystem of their own over `mail/` (see [`NodeProc::mail_dir`]).
    pub internal_beside_stores: bool,
    /// Like `extra_toml`, one text per node.
    pub extra_toml_nodes: Option<[String; 2]>,
    /// Run each node in a network namespace of its own (name, address);
    /// the heartbeat link on port 7000 and the sync port on 7001 of these
    /// addresses.
    pub netns: Option<[(&'static str, std::net::IpAddr); 2]>,
    /// More configuration (tables such as `[hooks]`) appended to both
    /// nodes' files; `{node_root}` becomes the node's directory.
    pub extra_toml: Option<String>,
    /// Extra keys of the `inbox` mailstore's table, e.g.
    /// `kind = "dovecot-maildir", uid_margin = 1000`.
    pub inbox_kind: Option<&'static str>,
    /// `queue.post_ingest_hook` of both nodes (argv); `{node_root}` in an
    /// argument becomes the node's directory.
    pub post_ingest_hook: Option<Vec<String>>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            heartbeat_interval_ms: 200,
            heartbeat_lost_threshold: 5,
            startup_wait_ms: 2000,
            recovery: "become-secondary",
            priorities: [200, 100],
            verify_interval_ms: 600_000,
            flush_alarm_ms: 30_000,
            durability: "syncfs",
            zero_copy: true,
            watch_foreign_writes: true,
            queue_layout: "postfix",
            queue_sync: "off",
            queue_sync_interval_ms: 60_000,
            internal_beside_stores: false,
            post_ingest_hook: None,
            inbox_kind: None,
            extra_toml: None,
            netns: None,
            extra_toml_nodes: None,
        }
    }
}

/// One node: its directories, config and (when running) process.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub queue_dir: PathBuf,
    pub log_path: PathBuf,
    pub listen: SocketAddr,
    /// Mailstore roots by name.
    pub mailstores: Vec<(String, PathBuf)>,
    exe: PathBuf,
    /// Runs inside this network namespace (`ip netns exec`).
    netns: Option<String>,
    /// Runs in a user namespace of its own with this inotify watch limit
    /// (see [`NodeProc::limit_watches`]).
    watch_limit: Option<u64>,
    child: Option<Child>,
}

/// Two nodes wired to each other.
#[derive(Debug)]
pub struct Pair {
    pub nodes: [NodeProc; 2],
    pub options: PairOptions,
}

/// A port for a daemon to listen on, below the kernel's ephemeral range:
/// ports from that range are handed to outgoing connections, and one of them
/// could hold a listen port while its node restarts. Ports are handed out
/// once per process, starting at an offset taken from the pid so that
/// parallel test processes rarely meet; each is checked by binding it.
fn free_port() -> std::io::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (start, span) = (10_000u32, low.saturating_sub(10_000).max(1000));
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() * 97 % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = start + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr();
        }
    }
    Err(std::io::Error::other(
        "no free port below the ephemeral range",
    ))
}

impl Pair {
    /// Lays out both nodes under `base` (which must exist) with a shared secret.
    pub fn create(exe: &Path, base: &Path, options: PairOptions) -> std::io::Result<Pair> {
        let names = ["mx1", "mx2"];
        let (addrs, sync_addrs) = match &options.netns {
            // Each node in a network namespace of its own: fixed ports.
            Some(ns) => (
                [
                    SocketAddr::new(ns[0].1, 7000),
                    SocketAddr::new(ns[1].1, 7000),
                ],
                [
                    SocketAddr::new(ns[0].1, 7001),
                    SocketAddr::new(ns[1].1, 7001),
                ],
            ),
            None => ([free_port()?, free_port()?], [free_port()?, free_port()?]),
        };
        let mut nodes = Vec::new();
        for i in 0..2 {
            let root = base.join(names[i]);
            let state_dir = root.join("state");
            let queue_dir = root.join("queue");
            for d in ["state", "queue", "mail/inbox", "mail/quarantine"] {
                fs::create_dir_all(root.join(d))?;
            }
            // Each node has its own copy of the shared secret, so a test can
            // give one node a wrong one.
            let secret = root.join("link.secret");
            fs::write(&secret, b"demo-secret-0123456789abcdef\n")?;
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&secret, fs::Permissions::from_mode(0o600))?;
            }
            let config_path = root.join("hasync.toml");
            let text = format!(
                r#"node_name = "{name}"
priority = {prio}
state_dir = "state"
queue_dir = "queue"
recovery = "{recovery}"

[link]
listen = "{listen}"
peer = "{peer}"
peer_name = "{peer_name}"
secret_file = "{secret}"
heartbeat_interval_ms = {interval}
heartbeat_lost_threshold = {threshold}
startup_wait_ms = {startup}

[replication]
sync_listen = "{sync_listen}"
sync_peer = "{sync_peer}"
verify_interval_ms = {verify}
flush_alarm_ms = {flush_alarm}
durability = "{durability}"
zero_copy = {zero_copy}
watch_foreign_writes = {watch_foreign}

[queue]
layout = "{layout}"
sync = "{queue_sync}"
sync_interval_ms = {queue_sync_interval}
{hook}
[mailstores]
inbox = {inbox}
quarantine = "mail/quarantine"
{internal}{extra}"#,
                extra = options
                    .extra_toml
                    .iter()
                    .chain(options.extra_toml_nodes.as_ref().map(|n| &n[i]))
                    .map(|t| format!(
                        "\n{}\n",
                        t.replace("{node_root}", &root.display().to_string())
                    ))
                    .collect::<String>(),
                internal = if options.internal_beside_stores {
                    "\n[internal_dirs]\ninbox = \"mail/.hasync-inbox\"\nquarantine = \"mail/.hasync-quarantine\"\nqueue = \"queue-internal\"\n"
                } else {
                    ""
                },
                hook = options
                    .post_ingest_hook
                    .as_ref()
                    .map(|h| {
                        let h: Vec<String> = h
                            .iter()
                            .map(|a| a.replace("{node_root}", &root.display().to_string()))
                            .collect();
                        format!("post_ingest_hook = {h:?}\n")
                    })
                    .unwrap_or_default(),
                inbox = match options.inbox_kind {
                    Some(extra) => format!("{{ path = \"mail/inbox\", {extra} }}"),
                    None => "\"mail/inbox\"".to_string(),
                },
                layout = options.queue_layout,
                queue_sync = options.queue_sync,
                queue_sync_interval = options.queue_sync_interval_ms,
                sync_listen = sync_addrs[i],
                sync_peer = sync_addrs[1 - i],
                verify = options.verify_interval_ms,
                flush_alarm = options.flush_alarm_ms,
                durability = options.durability,
                zero_copy = options.zero_copy,
                watch_foreign = options.watch_foreign_writes,
                name = names[i],
                prio = options.priorities[i],
                recovery = options.recovery,
                listen = addrs[i],
                peer = addrs[1 - i],
                peer_name = names[1 - i],
                secret = secret.display(),
                interval = options.heartbeat_interval_ms,
                threshold = options.heartbeat_lost_threshold,
                startup = options.startup_wait_ms,
            );
            fs::write(&config_path, text)?;
            nodes.push(NodeProc {
                mailstores: vec![
                    ("inbox".to_string(), root.join("mail/inbox")),
                    ("quarantine".to_string(), root.join("mail/quarantine")),
                ],
                name: names[i].to_string(),
                log_path: root.join("hasync.log"),
                root,
                config_path,
                state_dir,
                queue_dir,
                listen: addrs[i],
                exe: exe.to_owned(),
                netns: options.netns.as_ref().map(|ns| ns[i].0.to_string()),
                watch_limit: None,
                child: None,
            });
        }
        let [a, b]: [NodeProc; 2] = nodes.try_into().expect("two nodes");
        Ok(Pair {
            nodes: [a, b],
            options,
        })
    }

    /// The failure-detection window of the pair's settings.
    pub fn detection_window(&self) -> Duration {
        Duration::from_millis(
            self.options.heartbeat_interval_ms * u64::from(self.options.heartbeat_lost_threshold),
        )
    }

    /// Waits until one node is primary and the other secondary (its first
    /// sync may still run); returns the index of the primary.
    pub fn wait_roles(&self, timeout: Duration) -> Result<usize, String> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            let s: Vec<_> = self.nodes.iter().map(|n| n.status().ok()).collect();
            if let (Some(a), Some(b)) = (&s[0], &s[1]) {
                use crate::failover::Role::{Primary, Secondary};
                match (a.mode, b.mode) {
                    (Primary, Secondary) => return Ok(0),
                    (Secondary, Primary) => return Ok(1),
                    (x, y) => last = format!("{x} / {y}"),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "pair did not form within {timeout:?} (last roles: {last})"
        ))
    }

    /// Waits until the pair is formed: one node primary, the other
    /// secondary with its replica complete (its first sync finished: only
    /// then does it take over when the primary is lost); returns the index
    /// of the primary.
    pub fn wait_formed(&self, timeout: Duration) -> Result<usize, String> {
        let start = Instant::now();
        let p = self.wait_roles(timeout)?;
        let left = timeout.saturating_sub(start.elapsed());
        self.nodes[1 - p]
            .wait_status(left, Duration::from_millis(20), |s| {
                s.replication.caught_up && !s.replication.replica_incomplete
            })
            .map_err(|e| format!("the secondary's first sync did not finish: {e}"))?;
        Ok(p)
    }
}

impl NodeProc {
    /// The folder holding this node's mailstores (and, with
    /// `internal_beside_stores`, their internal directories).
    pub fn mail_dir(&self) -> PathBuf {
        self.root.join("mail")
    }

    /// Makes the store folders again (after a filesystem was mounted over
    /// [`NodeProc::mail_dir`]).
    pub fn make_store_dirs(&self) -> std::io::Result<()> {
        for (_, p) in &self.mailstores {
            fs::create_dir_all(p)?;
        }
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        control::socket_path(&self.state_dir)
    }

    /// Starts `hasync run` for this node, logging to `log_path`.
    pub fn start(&mut self) -> std::io::Result<()> {
        self.start_with_env(&[])
    }

    /// Like [`NodeProc::start`] with extra environment (e.g. failpoints).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) -> std::io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = match (&self.netns, self.watch_limit) {
            // `ip netns exec` execs the daemon: the child's pid is hasync's.
            (Some(ns), None) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(&self.exe);
                c
            }
            // So do `unshare` and the shell that sets the limit.
            (None, Some(watches)) => {
                let mut c = Command::new("unshare");
                c.args(["--user", "--map-root-user", "sh", "-c"])
                    .arg(format!(
                        "echo {watches} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""
                    ))
                    .arg(&self.exe);
                c
            }
            (None, None) => Command::new(&self.exe),
            (Some(_), Some(_)) => {
                return Err(std::io::Error::other(
                    "a node in a network namespace cannot have a watch limit of its own",
                ))
            }
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("HASYNC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// From the next start on, the daemon runs in a user namespace of its
    /// own (util-linux's `unshare`, root mapped to root) whose inotify
    /// watch limit is `watches`: a node that runs out of watches, without
    /// lowering the host's limit for every other process.
    pub fn limit_watches(&mut self, watches: u64) {
        self.watch_limit = Some(watches);
    }

    /// Sets the running daemon's inotify watch limit (see
    /// [`NodeProc::limit_watches`]) to `watches` (`nsenter` into its user
    /// namespace).
    pub fn set_watch_limit(&self, watches: u64) -> std::io::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| std::io::Error::other("the node is not running"))?;
        let status = Command::new("nsenter")
            .args(["--user", "--target", &pid.to_string(), "sh", "-c"])
            .arg(format!(
                "echo {watches} > /proc/sys/user/max_inotify_watches"
            ))
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "setting the watch limit of pid {pid}: nsenter {status}"
            )));
        }
        Ok(())
    }

    /// SIGSTOP / SIGCONT: a frozen daemon (neither heartbeats nor
    /// replicates) that still exists, e.g. to hold a lag window open.
    pub fn freeze(&self, frozen: bool) {
        if let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| rustix::process::Pid::from_raw(c.id() as i32))
        {
            let sig = if frozen {
                rustix::process::Signal::STOP
            } else {
                rustix::process::Signal::CONT
            };
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGKILL: the process gets no chance to tidy up.
    pub fn kill9(&mut self) -> std::io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; true if it
    /// exited (SIGKILL after the timeout).
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_ref() else {
            return true;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let exited = self.wait_exit(timeout);
        if !exited {
            let _ = self.kill9();
        }
        exited
    }

    /// Waits for the process to exit (e.g. at a failpoint); true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(_))) | None => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A manual switchover as `hasync failover --wait` makes it: asked
    /// again while the node says it would leave changes behind.
    pub fn switchover(&self, timeout: Duration) -> Result<Response, String> {
        let until = Instant::now() + timeout;
        loop {
            let r = self.request(&Request::Failover { force: false })?;
            let not_safe = r
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(crate::daemon::NOT_SAFE));
            if !not_safe || Instant::now() >= until {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn request(&self, req: &Request) -> Result<Response, String> {
        control::request(&self.socket(), req, Duration::from_secs(2)).map_err(|e| e.to_string())
    }

    pub fn status(&self) -> Result<Status, String> {
        let r = self.request(&Request::Status)?;
        r.status
            .ok_or_else(|| r.error.unwrap_or_else(|| "no status in response".into()))
    }

    /// Polls status every `every` until `pred` holds.
    pub fn wait_status(
        &self,
        timeout: Duration,
        every: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Result<Status, String> {
        let start = Instant::now();
        let mut last = Err("never answered".to_string());
        while start.elapsed() < timeout {
            last = self.status();
            if let Ok(s) = &last {
                if pred(s) {
                    return Ok(s.clone());
                }
            }
            std::thread::sleep(every);
        }
        Err(format!(
            "{}: condition not reached within {timeout:?}; last status: {last:?}",
            self.name
        ))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log once `pred` holds of it, or as it stands after `within`:
    /// records reach the file from the daemon's log writer thread, a
    /// moment after the event they tell of.
    pub fn log_when(&self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if pred(&log) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the log shows `needle` within [`LOG_WAIT`].
    pub fn log_shows(&self, needle: &str) -> bool {
        self.log_when(LOG_WAIT, |l| l.contains(needle))
            .contains(needle)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}
