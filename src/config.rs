//! The daemon's TOML configuration.
//!
//! The file is parsed with serde (`deny_unknown_fields`, so a typo in a key is
//! an error that names the line and the key) into private "raw" structs, which
//! are then validated and turned into [`Config`]. Validation happens in two
//! stages:
//!
//! * [`Config::parse`] checks everything that can be checked without touching
//!   the filesystem (names, addresses, timing, path overlap).
//! * [`Config::validate_filesystem`] checks that the directories exist, that
//!   `state_dir` is writable and that the link secret is readable and long
//!   enough. [`Config::load`] does both.
//!
//! Relative paths (`state_dir`, `queue_dir`, mailstores, `link.secret_file`)
//! are resolved against the directory that contains the configuration file,
//! and all paths are normalised lexically (`.` dropped, `..` folded), so every
//! path in a [`Config`] is absolute.
//!
//! Durations (`link.heartbeat_interval_ms`, `link.startup_wait_ms`) are either
//! an integer number of milliseconds or a string understood by
//! [`humantime::parse_duration`] such as `"200ms"` or `"1s"`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::failover::{RecoveryPolicy, TieBreak};

/// Heartbeat interval used when `link.heartbeat_interval_ms` is omitted.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// Missed heartbeats tolerated when `link.heartbeat_lost_threshold` is omitted.
pub const DEFAULT_HEARTBEAT_LOST_THRESHOLD: u32 = 5;
/// Smallest accepted heartbeat interval.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Largest accepted heartbeat interval.
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Largest accepted `link.heartbeat_lost_threshold` (the smallest is 1).
pub const HEARTBEAT_LOST_THRESHOLD_MAX: u32 = 1000;
/// Largest accepted `link.startup_wait_ms`.
pub const STARTUP_WAIT_MAX: Duration = Duration::from_secs(10 * 60);
/// Minimum length of the link secret, after trimming the trailing newline.
pub const SECRET_BYTES_MIN: usize = 16;
/// Maximum length in bytes of node, peer and mailstore names.
pub const NAME_BYTES_MAX: usize = 64;

/// The validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's name (`[A-Za-z0-9._-]`, 1..=64 bytes).
    pub node_name: String,
    /// Start-up election priority; the higher priority wins.
    pub priority: u8,
    /// Directory for the epoch file and the control socket (absolute).
    pub state_dir: PathBuf,
    /// The mail queue directory that is kept in sync (absolute).
    pub queue_dir: PathBuf,
    /// What a recovered former primary does.
    pub recovery: RecoveryPolicy,
    /// How an equal-priority election is decided.
    pub tie_break: TieBreak,
    /// The heartbeat link to the peer.
    pub link: LinkConfig,
    /// Named mailstore directories that are kept in sync (absolute paths).
    pub mailstores: BTreeMap<String, PathBuf>,
    /// Mailstores that are more than a tree of files (`kind = …` in their
    /// table form); the others are absent.
    pub mailstore_kinds: BTreeMap<String, StoreKind>,
    /// The `[replication]` table: how mailstores are replicated.
    pub replication: ReplicationConfig,
    /// The `[queue]` table: the mail queue's layout and its failover push.
    pub queue: QueueConfig,
    /// The `[hooks]` table: commands run as the role changes.
    pub hooks: HooksConfig,
    /// The `[quorum]` table: the third vote.
    pub quorum: QuorumConfig,
    /// `[[vip]]`: service addresses that follow the primary.
    pub vips: Vec<crate::vip::VipSpec>,
    /// `[metrics] listen`: Prometheus metrics at `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// The `[internal_dirs]` table: where hasync keeps its staging and
    /// conflicts for a store (or `queue`), when not under `state_dir`.
    pub internal_dirs: BTreeMap<String, PathBuf>,
    /// The file this configuration came from (as given to `load`/`parse`).
    pub source: PathBuf,
}

/// The `[link]` table: heartbeat link to the peer node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Address the heartbeat link listens on.
    pub listen: SocketAddr,
    /// The peer's listen address.
    pub peer: SocketAddr,
    /// The peer's node name.
    pub peer_name: String,
    /// File holding the pre-shared link secret (absolute).
    pub secret_file: PathBuf,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Number of missed intervals after which the peer is considered lost.
    pub heartbeat_lost_threshold: u32,
    /// How long a starting node waits to hear from its peer.
    pub startup_wait: Duration,
    /// More heartbeat paths (another interface or network), each with its
    /// own connections: the peer counts as lost only when every path is
    /// silent.
    pub paths: Vec<HeartbeatPath>,
}

/// One more heartbeat path (`link.paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatPath {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
}

/// At most this many paths besides `link.listen`/`link.peer`.
pub const EXTRA_PATHS_MAX: usize = 3;

/// The `[replication]` table: continuous mailstore replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Address the sync connection listens on (default: link.listen port + 1).
    /// Bulk data has its own port so that it never delays a heartbeat.
    pub sync_listen: SocketAddr,
    /// The peer's sync address (default: link.peer port + 1).
    pub sync_peer: SocketAddr,
    /// Glob patterns (relative to a mailstore root) that are not replicated.
    pub exclude: Vec<String>,
    /// How often the primary verifies the whole replica (anti-entropy).
    pub verify_interval: Duration,
    /// A flush on the secondary that has not returned this long is an
    /// alarm (a hung disk): nothing is acknowledged meanwhile.
    pub flush_alarm: Duration,
    /// How the secondary makes a batch durable (`syncfs` or `fsync`).
    pub durability: crate::model::Durability,
    /// Send large files' content by splice (page cache → socket) instead of
    /// reading it into memory first.
    pub zero_copy: bool,
    /// Let the peer set setuid, setgid and world-writable modes on the
    /// replica (refused by default: the primary mirrors mail, it does not
    /// own the secondary).
    pub allow_special_modes: bool,
    /// A secondary watches its replica for writes by other processes
    /// (fanotify), keeps them aside and alarms.
    pub watch_foreign_writes: bool,
}

/// The `[queue]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// How messages are stored in `queue_dir`.
    pub layout: crate::queue::layout::Layout,
    /// Command (argv) run on the new primary after pushed messages land,
    /// e.g. `["postsuper", "-c", "/etc/postfix", "-s"]` to rename Postfix
    /// queue files to their new inodes (`-c` names the instance whose
    /// `queue_directory` is `queue_dir`).
    pub post_ingest_hook: Option<Vec<String>>,
    /// Dedup ledger bounds: entries and age.
    pub ledger_max_entries: usize,
    pub ledger_max_age: Duration,
    /// Queue replication to the secondary (kept outside its live queue).
    pub sync: QueueSync,
    /// Zero-loss commit: how long a commit waits for the peer before it
    /// returns as local-only.
    pub commit_timeout: Duration,
    /// With `sync = "periodic"`: how often queue changes are sent.
    pub sync_interval: Duration,
}

/// The `[hooks]` table: commands run as the node's role changes, so the
/// machine acts on it (the MTA and IMAP server run on the primary only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksConfig {
    /// Once the node serves as primary: its epoch durable, a continuous
    /// queue replica promoted, IMAP UIDs raised.
    pub on_primary: Option<Vec<String>>,
    /// When the node stops serving or starts as secondary: at start, on
    /// demotion, before a switchover hands over, at shutdown of a primary.
    pub on_secondary: Option<Vec<String>>,
    /// On entering `failed`.
    pub on_failed: Option<Vec<String>>,
    /// On entering `off`.
    pub on_off: Option<Vec<String>>,
    /// A hook still running after this long is killed (with what it started).
    pub timeout: Duration,
    /// What a failed `on_primary` does.
    pub on_primary_failure: HookFailure,
    /// How long a switchover may take to stop services and drain
    /// replication before it is abandoned.
    pub switchover_timeout: Duration,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            on_primary: None,
            on_secondary: None,
            on_failed: None,
            on_off: None,
            timeout: Duration::from_secs(60),
            on_primary_failure: HookFailure::Alarm,
            switchover_timeout: Duration::from_secs(30),
        }
    }
}

/// The `[quorum]` table: the third vote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QuorumConfig {
    pub mode: QuorumMode,
    /// Ping mode: what this node must reach (a majority of them).
    pub targets: Vec<crate::quorum::Target>,
    /// Ping mode: time between probe rounds.
    pub interval: Duration,
    /// Etcd mode: the cluster's client URLs.
    pub endpoints: Vec<String>,
    /// Etcd mode: the key whose holder is primary.
    pub key: String,
    /// Etcd mode: the lease's time to live (whole seconds).
    pub lease_ttl: Duration,
}

/// `quorum.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumMode {
    /// A silent peer is a dead peer (a cut of every link between the
    /// nodes gives two primaries until it heals).
    #[default]
    None,
    /// A node must reach a majority of `targets` to promote, and a primary
    /// that reaches neither its peer nor them steps down.
    Ping,
    /// The primary role is a lease in an etcd cluster (`endpoints`).
    Etcd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    interface: String,
}

/// At most this many `[[vip]]` addresses.
pub const VIPS_MAX: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    #[serde(default)]
    mode: QuorumMode,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default, deserialize_with = "de_quorum_interval")]
    interval_ms: Option<Duration>,
    #[serde(default)]
    endpoints: Vec<String>,
    key: Option<String>,
    #[serde(default, deserialize_with = "de_lease_ttl")]
    lease_ttl_ms: Option<Duration>,
}

fn de_lease_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "quorum.lease_ttl_ms").map(Some)
}

fn de_quorum_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "quorum.interval_ms").map(Some)
}

/// `hooks.on_primary_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookFailure {
    /// Alarm and keep serving.
    #[default]
    Alarm,
    /// Alarm and go `off` (the peer takes over); `hasync join` brings the
    /// node back.
    StepDown,
}

/// `queue.sync`: whether the queue is replicated beyond the failover push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueSync {
    /// As on the appliances: only the push after a failover.
    #[default]
    Off,
    /// Every change, through the change tracker, like the mailstores.
    Continuous,
    /// Changes of the queue are sent at most every `queue.sync_interval_ms`.
    Periodic,
}

/// Default exclude: Maildir `tmp/` holds messages still being written.
pub const DEFAULT_EXCLUDE: &str = "**/tmp/*";
/// Default anti-entropy interval.
pub const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(600);
/// `replication.flush_alarm_ms` unless configured.
pub const DEFAULT_FLUSH_ALARM: Duration = Duration::from_secs(30);

/// Everything that can go wrong while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
    /// TOML syntax error, unknown key, missing key or wrong value type. The
    /// toml crate's message names the line, the column and the key.
    #[error("{}: {error}", path.display())]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The toml crate's error.
        error: toml::de::Error,
    },
    /// A value that is well-formed but not acceptable, e.g.
    /// `hasync.toml: link.heartbeat_lost_threshold = 0: must be at least 1`.
    #[error("{}: {key} = {value}: {problem}", source_file.display())]
    Invalid {
        /// The configuration file.
        source_file: PathBuf,
        /// Dotted key, e.g. `link.heartbeat_lost_threshold` or `mailstores.inbox`.
        key: String,
        /// The offending value, rendered for humans (strings and paths quoted).
        value: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Reads, parses and fully validates (including the filesystem checks) the
    /// configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config = Config::parse(&text, path)?;
        config.validate_filesystem()?;
        Ok(config)
    }

    /// Only `state_dir` (where the control socket is), for the commands that
    /// talk to a running daemon: they must answer when the node is
    /// unhealthy (a vanished mailstore directory, which is what made the
    /// node fail) or the file was edited since the daemon started.
    pub fn load_state_dir(path: &Path) -> Result<PathBuf, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        #[derive(Deserialize)]
        struct OnlyStateDir {
            state_dir: PathBuf,
        }
        let raw: OnlyStateDir = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        resolve_path(&config_base_dir(path), "state_dir", &raw.state_dir).map_err(|problem| {
            ConfigError::Invalid {
                source_file: path.to_path_buf(),
                key: "state_dir".into(),
                value: quote_path(&raw.state_dir),
                problem,
            }
        })
    }

    /// Parses `text` and runs every check that does not need the filesystem.
    /// `source` is used in error messages and to resolve relative paths.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: source.to_path_buf(),
            error,
        })?;
        raw.validate(source)
    }

    /// Checks that `state_dir`, `queue_dir` and every mailstore exist and are
    /// directories, that `state_dir` is writable, that the synchronised
    /// directories do not overlap once symlinks are resolved, and that the
    /// link secret is readable and long enough.
    pub fn validate_filesystem(&self) -> Result<(), ConfigError> {
        for (i, v) in self.vips.iter().enumerate() {
            if !Path::new("/sys/class/net").join(&v.interface).exists() {
                return Err(self.invalid(
                    &format!("vip[{i}].interface"),
                    quote(&v.interface),
                    "no such network interface on this machine",
                ));
            }
        }
        self.check_dir("state_dir", &self.state_dir)?;
        rustix::fs::access(
            &self.state_dir,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        )
        .map_err(|errno| {
            self.invalid(
                "state_dir",
                quote_path(&self.state_dir),
                format!("directory is not writable: {}", io::Error::from(errno)),
            )
        })?;
        self.check_dir("queue_dir", &self.queue_dir)?;
        for (name, path) in &self.mailstores {
            self.check_dir(&mailstore_key(name), path)?;
        }

        // The lexical overlap check already ran in `parse`; repeat it on the
        // canonical paths to catch overlap introduced by symlinks.
        let mut canonical = Vec::with_capacity(self.mailstores.len() + 1);
        for (key, path) in self.synced_dirs() {
            let real = std::fs::canonicalize(path).map_err(|e| {
                self.invalid(&key, quote_path(path), format!("cannot resolve path: {e}"))
            })?;
            canonical.push((key, real));
        }
        check_overlap(&canonical, " (after resolving symlinks)")
            .map_err(|(key, value, problem)| self.invalid(&key, value, problem))?;
        let state = std::fs::canonicalize(&self.state_dir).map_err(|e| {
            self.invalid(
                "state_dir",
                quote_path(&self.state_dir),
                format!("cannot resolve path: {e}"),
            )
        })?;
        check_state_dir(&state, &canonical, " (after resolving symlinks)")
            .map_err(|(key, value, problem)| self.invalid(&key, value, problem))?;
        // A staged file lands by rename: its internal directory must be on
        // the store's filesystem, or the rename is not atomic (EXDEV).
        for (name, dir) in self.internal_layout() {
            let key = format!("internal_dirs.{name}");
            let (store_key, store) = if name == QUEUE_INTERNAL {
                ("queue_dir".to_string(), self.queue_dir.clone())
            } else {
                (mailstore_key(&name), self.mailstores[&name].clone())
            };
            // It may not exist yet (the daemon makes it): resolve what does.
            let real = nearest_existing(&dir).and_then(|p| std::fs::canonicalize(p).ok());
            let resolved = nearest_existing(&dir)
                .zip(real.as_ref())
                .and_then(|(anc, real)| dir.strip_prefix(anc).ok().map(|rest| real.join(rest)));
            if let Some(resolved) = &resolved {
                check_internal(resolved, &canonical, " (after resolving symlinks)")
                    .map_err(|p| self.invalid(&key, quote_path(&dir), p))?;
            }
            let dev =
                |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            match (dev(&store), real.as_deref().map(dev)) {
                (Ok(a), Some(Ok(b))) if a != b => {
                    let hint = store
                        .parent()
                        .unwrap_or(&store)
                        .join(format!(".hasync-{name}"));
                    return Err(self.invalid(
                        &key,
                        quote_path(&dir),
                        format!(
                            "is on another filesystem than {store_key} ({}): staged files could not be renamed into place atomically; set internal_dirs.{name} to a directory on that filesystem, outside the store (for example {})",
                            quote_path(&store),
                            quote_path(&hint)
                        ),
                    ));
                }
                _ => {}
            }
        }

        self.read_secret()?;
        Ok(())
    }

    /// Reads the link secret. One trailing `\n` or `\r\n` is trimmed; the
    /// remainder must be at least [`SECRET_BYTES_MIN`] bytes.
    pub fn read_secret(&self) -> Result<Vec<u8>, ConfigError> {
        use std::os::unix::fs::MetadataExt;
        const KEY: &str = "link.secret_file";
        let path = &self.link.secret_file;
        // Like ssh with a private key: a secret others can read is not one.
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(self.invalid(
                    KEY,
                    quote_path(path),
                    format!(
                        "secret file has mode {mode:04o}: group or others may read it; \
                         run `chmod 600 {}`",
                        path.display()
                    ),
                ));
            }
            let euid = rustix::process::geteuid().as_raw();
            if meta.uid() != euid && meta.uid() != 0 {
                return Err(self.invalid(
                    KEY,
                    quote_path(path),
                    format!(
                        "secret file is owned by uid {}, neither root nor this user (uid {euid})",
                        meta.uid()
                    ),
                ));
            }
        }
        let mut secret = std::fs::read(path).map_err(|e| {
            let problem = if e.kind() == io::ErrorKind::NotFound {
                "secret file does not exist".to_string()
            } else {
                format!("cannot read secret file: {e}")
            };
            self.invalid(KEY, quote_path(path), problem)
        })?;
        if secret.last() == Some(&b'\n') {
            secret.pop();
            if secret.last() == Some(&b'\r') {
                secret.pop();
            }
        }
        if secret.len() < SECRET_BYTES_MIN {
            return Err(self.invalid(
                KEY,
                quote_path(path),
                format!(
                    "secret is {} bytes long (after trimming the trailing newline); \
                     at least {SECRET_BYTES_MIN} bytes are required",
                    secret.len()
                ),
            ));
        }
        Ok(secret)
    }

    /// Time without heartbeats after which the peer is declared lost:
    /// `heartbeat_interval * heartbeat_lost_threshold`.
    pub fn detection_time(&self) -> Duration {
        self.link
            .heartbeat_interval
            .checked_mul(self.link.heartbeat_lost_threshold)
            .unwrap_or(Duration::MAX)
    }

    /// A multi-line, human-readable explanation of this configuration, for
    /// `hasync check-config`.
    pub fn explain(&self) -> String {
        const W: usize = 20;
        let mut out = String::new();
        let link = &self.link;
        // Writing into a String cannot fail, so the fmt::Results are ignored.
        let _ = writeln!(out, "hasync configuration from {}", self.source.display());

        let _ = writeln!(out, "\nNode");
        let _ = writeln!(out, "  {:W$} {}", "node_name", self.node_name);
        let _ = writeln!(
            out,
            "  {:W$} {} (0..=255; at start-up the node with the higher priority becomes primary)",
            "priority", self.priority
        );
        let (lower, higher) = if self.node_name.as_str() <= link.peer_name.as_str() {
            (&self.node_name, &link.peer_name)
        } else {
            (&link.peer_name, &self.node_name)
        };
        let tie = match self.tie_break {
            TieBreak::LowerName => format!(
                "lower-name: on equal priority the node with the lower name wins (here: {lower})"
            ),
            TieBreak::HigherName => format!(
                "higher-name: on equal priority the node with the higher name wins (here: {higher})"
            ),
        };
        let _ = writeln!(out, "  {:W$} {tie}", "tie_break");
        let recovery = match self.recovery {
            RecoveryPolicy::BecomeSecondary => {
                "become-secondary: a recovered former primary joins as secondary and \
                 pushes its local queue to the new primary"
            }
            RecoveryPolicy::RestoreRole => {
                "restore-role: a recovered former primary joins as secondary, pushes its \
                 queue, catches up, then takes the primary role back by a clean switchover"
            }
            RecoveryPolicy::Off => {
                "off: a recovered former primary stays out of the pair until an operator \
                 runs `hasync join`"
            }
        };
        let _ = writeln!(out, "  {:W$} {recovery}", "recovery");

        let _ = writeln!(out, "\nHeartbeat link");
        let _ = writeln!(out, "  {:W$} {}", "listen", link.listen);
        let _ = writeln!(out, "  {:W$} {} at {}", "peer", link.peer_name, link.peer);
        let _ = writeln!(out, "  {:W$} {}", "secret_file", link.secret_file.display());
        for (i, p) in link.paths.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:W$} listen {}, peer {} (heartbeats on every path; the peer is lost only when all are silent, one silent path is an alarm)",
                format!("path {}", i + 2),
                p.listen,
                p.peer
            );
        }
        if link.paths.is_empty() {
            let _ = writeln!(
                out,
                "  {:W$} one (a cut of this link alone looks like a dead peer: add [[link.paths]] or a quorum)",
                "paths"
            );
        }

        let _ = writeln!(out, "\nTiming");
        let _ = writeln!(
            out,
            "  {:W$} {}",
            "heartbeat interval",
            humantime::format_duration(link.heartbeat_interval)
        );
        let _ = writeln!(
            out,
            "  {:W$} {} missed heartbeat(s)",
            "lost threshold", link.heartbeat_lost_threshold
        );
        let _ = writeln!(
            out,
            "  {:W$} {} (interval x threshold: the peer is declared lost after this long without heartbeats)",
            "failover detection",
            humantime::format_duration(self.detection_time())
        );
        let _ = writeln!(
            out,
            "  {:W$} {} (how long a starting node waits to hear its peer)",
            "startup wait",
            humantime::format_duration(link.startup_wait)
        );

        let _ = writeln!(out, "\nDirectories");
        let _ = writeln!(
            out,
            "  {:W$} {} (epoch file, control socket)",
            "state_dir",
            self.state_dir.display()
        );
        let _ = writeln!(
            out,
            "  {:W$} {} (synchronised)",
            "queue_dir",
            self.queue_dir.display()
        );

        if self.mailstores.is_empty() {
            let _ = writeln!(out, "\nMailstores: none");
        } else {
            let _ = writeln!(
                out,
                "\nMailstores ({}, synchronised)",
                self.mailstores.len()
            );
            for (name, path) in &self.mailstores {
                match self.mailstore_kinds.get(name) {
                    Some(StoreKind::DovecotMaildir { uid_margin }) => {
                        let _ = writeln!(
                            out,
                            "  {name:W$} {} (dovecot-maildir: next IMAP UIDs raised by {uid_margin} at promotion)",
                            path.display()
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  {name:W$} {}", path.display());
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\nInternal directories (staging and conflicts: outside the live trees, each on its store's filesystem)"
        );
        for (name, dir) in self.internal_layout() {
            let _ = writeln!(out, "  {name:W$} {}", dir.display());
        }
        let _ = writeln!(
            out,
            "  {:W$} {}",
            "foreign writes",
            if self.replication.watch_foreign_writes {
                "watched while secondary: writes into the replica by other processes are kept aside and alarmed"
            } else {
                "not watched (replication.watch_foreign_writes = false): only verification finds them"
            }
        );
        self.explain_roles(&mut out);
        out
    }

    fn explain_roles(&self, out: &mut String) {
        const W: usize = 20;
        let q = &self.quorum;
        let _ = writeln!(out, "\nQuorum");
        let detection = humantime::format_duration(self.detection_time());
        match q.mode {
            QuorumMode::None => {
                let _ = writeln!(
                    out,
                    "  {:W$} none: a silent peer counts as dead; a cut of every path between the nodes gives two primaries until it heals (the higher epoch wins then)",
                    "mode"
                );
            }
            QuorumMode::Ping => {
                let targets: Vec<String> = q.targets.iter().map(|t| t.to_string()).collect();
                let _ = writeln!(
                    out,
                    "  {:W$} ping: {} target(s) ({}), probed every {}; a node promotes without its peer only when it reaches {} of them, a primary that reaches neither its peer nor them steps down within about {detection}. Ping cannot decide when both nodes reach the targets but not each other",
                    "mode",
                    q.targets.len(),
                    targets.join(", "),
                    humantime::format_duration(q.interval),
                    q.targets.len() / 2 + 1,
                );
            }
            QuorumMode::Etcd => {
                let _ = writeln!(
                    out,
                    "  {:W$} etcd: the primary holds {} under a lease of {} at {}; nobody promotes without it, a primary that cannot renew steps down before it runs out unless it still hears its peer",
                    "mode",
                    q.key,
                    humantime::format_duration(q.lease_ttl),
                    q.endpoints.join(", "),
                );
            }
        }
        let h = &self.hooks;
        let _ = writeln!(
            out,
            "\nRole hooks (argv, no shell; killed after {})",
            humantime::format_duration(h.timeout)
        );
        for (name, argv) in [
            ("on_primary", &h.on_primary),
            ("on_secondary", &h.on_secondary),
            ("on_failed", &h.on_failed),
            ("on_off", &h.on_off),
        ] {
            let _ = writeln!(
                out,
                "  {name:W$} {}",
                argv.as_ref().map_or("-".to_string(), |a| format!("{a:?}"))
            );
        }
        let _ = writeln!(
            out,
            "  {:W$} {}",
            "on_primary fails",
            match h.on_primary_failure {
                HookFailure::Alarm => "alarm and keep serving",
                HookFailure::StepDown => "alarm and step down to off (the peer takes over)",
            }
        );
        let _ = writeln!(
            out,
            "  {:W$} {} (stop services and drain replication before the peer promotes)",
            "switchover limit",
            humantime::format_duration(h.switchover_timeout)
        );
        match self.metrics_listen {
            Some(m) => {
                let _ = writeln!(out, "\nMetrics: Prometheus text at http://{m}/metrics");
            }
            None => {
                let _ = writeln!(out, "\nMetrics: off (add [metrics] listen)");
            }
        }
        if self.vips.is_empty() {
            let _ = writeln!(out, "\nService addresses: none");
        } else {
            let _ = writeln!(
                out,
                "\nService addresses (added and announced on the primary before on_primary, removed on any demotion)"
            );
            for v in &self.vips {
                let _ = writeln!(out, "  {v}");
            }
        }
    }

    fn invalid(&self, key: &str, value: String, problem: impl Into<String>) -> ConfigError {
        invalid(&self.source, key, value, problem)
    }

    fn check_dir(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(self.invalid(key, quote_path(path), "exists but is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(self.invalid(key, quote_path(path), "directory does not exist"))
            }
            Err(e) => Err(self.invalid(key, quote_path(path), format!("cannot access: {e}"))),
        }
    }

    /// Where hasync keeps its own files (staging, conflicts) for store
    /// `name` (a mailstore, or [`QUEUE_INTERNAL`] for the queue push):
    /// `internal_dirs.<name>`, else `<state_dir>/internal/<name>`. Never
    /// inside a live tree, always on the store's filesystem (checked).
    pub fn internal_dir(&self, name: &str) -> PathBuf {
        self.internal_dirs
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.state_dir.join("internal").join(name))
    }

    /// Each store's internal directory, and the queue's.
    fn internal_layout(&self) -> Vec<(String, PathBuf)> {
        self.mailstores
            .keys()
            .map(|n| (n.clone(), self.internal_dir(n)))
            .chain(std::iter::once((
                QUEUE_INTERNAL.to_string(),
                self.internal_dir(QUEUE_INTERNAL),
            )))
            .collect()
    }

    /// `queue_dir` followed by the mailstores, each with its dotted key.
    fn synced_dirs(&self) -> impl Iterator<Item = (String, &Path)> {
        std::iter::once(("queue_dir".to_string(), self.queue_dir.as_path())).chain(
            self.mailstores
                .iter()
                .map(|(name, path)| (mailstore_key(name), path.as_path())),
        )
    }
}

// ---------------------------------------------------------------------------
// Raw (deserialised, unvalidated) form.

/// What a mailstore is, beyond a tree of files to mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Dovecot Maildirs: at promotion, before any role hook starts
    /// Dovecot, each mailbox's next IMAP UID (`N` in `dovecot-uidlist`) is
    /// raised by `uid_margin`, so a UID the old primary handed out in its
    /// replication lag window is never given to another message.
    DovecotMaildir { uid_margin: u32 },
}

/// Default `uid_margin`: more deliveries than one mailbox takes in any
/// replication lag window an appliance sees.
pub const DEFAULT_UID_MARGIN: i64 = 1000;
/// Largest `uid_margin` (UIDs are 32-bit; a margin this size leaves room
/// for millions of failovers).
pub const UID_MARGIN_MAX: i64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MailstoreKind {
    /// A tree of files (the default).
    Plain,
    DovecotMaildir,
}

/// `name = "path"`, or `name = { path = "…", kind = "dovecot-maildir" }`.
#[derive(Debug)]
enum RawMailstore {
    Path(PathBuf),
    Table(RawMailstoreTable),
}

// By hand rather than `untagged`, so that a mistake inside the table form
// is reported as itself (an unknown key, an unknown kind), not as "data
// did not match any variant".
impl<'de> Deserialize<'de> for RawMailstore {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawMailstore;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path, or a table { path = \"…\", kind = \"dovecot-maildir\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawMailstore, E> {
                Ok(RawMailstore::Path(PathBuf::from(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<RawMailstore, A::Error> {
                RawMailstoreTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(RawMailstore::Table)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMailstoreTable {
    path: PathBuf,
    kind: Option<MailstoreKind>,
    uid_margin: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: String,
    // Wider than u8 so that out-of-range values get our own error message.
    priority: i64,
    state_dir: PathBuf,
    queue_dir: PathBuf,
    #[serde(default)]
    recovery: RecoveryPolicy,
    #[serde(default)]
    tie_break: TieBreak,
    link: RawLink,
    #[serde(default)]
    mailstores: BTreeMap<String, RawMailstore>,
    #[serde(default)]
    replication: RawReplication,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    internal_dirs: BTreeMap<String, PathBuf>,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    quorum: RawQuorum,
    #[serde(default)]
    vip: Vec<RawVip>,
    metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: SocketAddr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    #[serde(default)]
    layout: crate::queue::layout::Layout,
    post_ingest_hook: Option<Vec<String>>,
    ledger_max_entries: Option<i64>,
    #[serde(default, deserialize_with = "de_ledger_max_age")]
    ledger_max_age_ms: Option<Duration>,
    #[serde(default)]
    sync: QueueSync,
    #[serde(default, deserialize_with = "de_commit_timeout")]
    commit_timeout_ms: Option<Duration>,
    #[serde(default, deserialize_with = "de_sync_interval")]
    sync_interval_ms: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    on_primary: Option<Vec<String>>,
    on_secondary: Option<Vec<String>>,
    on_failed: Option<Vec<String>>,
    on_off: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_hook_timeout")]
    timeout_ms: Option<Duration>,
    #[serde(default)]
    on_primary_failure: HookFailure,
    #[serde(default, deserialize_with = "de_switchover_timeout")]
    switchover_timeout_ms: Option<Duration>,
}

fn de_hook_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "hooks.timeout_ms").map(Some)
}

fn de_switchover_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "hooks.switchover_timeout_ms").map(Some)
}

fn de_sync_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "queue.sync_interval_ms").map(Some)
}

fn de_commit_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "queue.commit_timeout_ms").map(Some)
}

fn de_ledger_max_age<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "queue.ledger_max_age_ms").map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    sync_listen: Option<SocketAddr>,
    sync_peer: Option<SocketAddr>,
    exclude: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_verify_interval")]
    verify_interval_ms: Option<Duration>,
    #[serde(default, deserialize_with = "de_flush_alarm")]
    flush_alarm_ms: Option<Duration>,
    #[serde(default)]
    durability: crate::model::Durability,
    zero_copy: Option<bool>,
    allow_special_modes: Option<bool>,
    watch_foreign_writes: Option<bool>,
}

fn de_verify_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "replication.verify_interval_ms").map(Some)
}

fn de_flush_alarm<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "replication.flush_alarm_ms").map(Some)
}

fn port_plus_one(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port().wrapping_add(1))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    listen: SocketAddr,
    peer: SocketAddr,
    peer_name: String,
    secret_file: PathBuf,
    #[serde(default, deserialize_with = "de_heartbeat_interval")]
    heartbeat_interval_ms: Option<Duration>,
    #[serde(default)]
    heartbeat_lost_threshold: Option<i64>,
    #[serde(default, deserialize_with = "de_startup_wait")]
    startup_wait_ms: Option<Duration>,
    #[serde(default)]
    paths: Vec<HeartbeatPath>,
}

fn de_heartbeat_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "link.heartbeat_interval_ms").map(Some)
}

fn de_startup_wait<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(d, "link.startup_wait_ms").map(Some)
}

/// Deserialises a duration given either as an integer number of milliseconds
/// or as a humantime string (`"200ms"`, `"1s"`, `"1m 30s"`). `key` is the
/// dotted key, used in error messages.
fn deserialize_duration<'de, D: Deserializer<'de>>(
    d: D,
    key: &'static str,
) -> Result<Duration, D::Error> {
    struct DurationVisitor {
        key: &'static str,
    }

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a duration for {}: integer milliseconds or a string such as \"200ms\" or \"1s\"",
                self.key
            )
        }

        fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(ms))
        }

        fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Duration, E> {
            u64::try_from(ms).map(Duration::from_millis).map_err(|_| {
                E::custom(format!(
                    "{} = {ms}: a duration must not be negative",
                    self.key
                ))
            })
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|e| {
                E::custom(format!(
                    "{} = {text:?}: not a valid duration ({e}); use integer milliseconds \
                     or a string such as \"200ms\" or \"1s\"",
                    self.key
                ))
            })
        }
    }

    d.deserialize_any(DurationVisitor { key })
}

impl RawConfig {
    fn validate(self, source: &Path) -> Result<Config, ConfigError> {
        let err = |key: &str, value: String, problem: String| invalid(source, key, value, problem);
        let base = config_base_dir(source);

        check_name("node_name", &self.node_name)
            .map_err(|p| err("node_name", quote(&self.node_name), p))?;

        let priority = u8::try_from(self.priority).map_err(|_| {
            err(
                "priority",
                self.priority.to_string(),
                "must be between 0 and 255".to_string(),
            )
        })?;

        let state_dir = resolve_path(&base, "state_dir", &self.state_dir)
            .map_err(|p| err("state_dir", quote_path(&self.state_dir), p))?;
        let queue_dir = resolve_path(&base, "queue_dir", &self.queue_dir)
            .map_err(|p| err("queue_dir", quote_path(&self.queue_dir), p))?;

        let link = self.link.validate(source, &base, &self.node_name)?;

        let mut mailstores = BTreeMap::new();
        let mut mailstore_kinds = BTreeMap::new();
        for (name, raw) in self.mailstores {
            let key = mailstore_key(&name);
            let (path, kind) = match raw {
                RawMailstore::Path(p) => (p, None),
                RawMailstore::Table(t) => {
                    if t.uid_margin.is_some() && t.kind != Some(MailstoreKind::DovecotMaildir) {
                        return Err(err(
                            &format!("{key}.uid_margin"),
                            t.uid_margin.unwrap_or_default().to_string(),
                            "applies to kind = \"dovecot-maildir\" only".into(),
                        ));
                    }
                    let margin = t.uid_margin.unwrap_or(DEFAULT_UID_MARGIN);
                    if !(1..=UID_MARGIN_MAX).contains(&margin) {
                        return Err(err(
                            &format!("{key}.uid_margin"),
                            margin.to_string(),
                            format!("must be from 1 to {UID_MARGIN_MAX}"),
                        ));
                    }
                    let kind = match t.kind {
                        Some(MailstoreKind::DovecotMaildir) => Some(StoreKind::DovecotMaildir {
                            uid_margin: margin as u32,
                        }),
                        Some(MailstoreKind::Plain) | None => None,
                    };
                    (t.path, kind)
                }
            };
            check_name("mailstore name", &name).map_err(|p| err(&key, quote_path(&path), p))?;
            let resolved =
                resolve_path(&base, &key, &path).map_err(|p| err(&key, quote_path(&path), p))?;
            if let Some(kind) = kind {
                mailstore_kinds.insert(name.clone(), kind);
            }
            mailstores.insert(name, resolved);
        }

        let r = self.replication;
        let sync_listen = r.sync_listen.unwrap_or_else(|| port_plus_one(link.listen));
        let sync_peer = r.sync_peer.unwrap_or_else(|| port_plus_one(link.peer));
        check_address(&sync_listen, false)
            .map_err(|p| err("replication.sync_listen", sync_listen.to_string(), p))?;
        check_address(&sync_peer, true)
            .map_err(|p| err("replication.sync_peer", sync_peer.to_string(), p))?;
        if sync_listen == link.listen {
            return Err(err(
                "replication.sync_listen",
                sync_listen.to_string(),
                "the sync connection needs its own port, apart from the heartbeat link (link.listen)".into(),
            ));
        }
        if link.paths.iter().any(|p| p.listen == sync_listen) {
            return Err(err(
                "replication.sync_listen",
                sync_listen.to_string(),
                "is a heartbeat path's address (link.paths); the sync connection needs its own"
                    .into(),
            ));
        }
        if sync_peer == link.peer {
            return Err(err(
                "replication.sync_peer",
                sync_peer.to_string(),
                "the peer's sync port must differ from its heartbeat port (link.peer)".into(),
            ));
        }
        if sync_peer == sync_listen {
            return Err(err(
                "replication.sync_peer",
                sync_peer.to_string(),
                "peer equals self: sync_peer is this node's own sync_listen".into(),
            ));
        }
        let exclude = r
            .exclude
            .unwrap_or_else(|| vec![DEFAULT_EXCLUDE.to_string()]);
        for pat in &exclude {
            globset::GlobBuilder::new(pat)
                .literal_separator(true)
                .build()
                .map_err(|e| err("replication.exclude", quote(pat), e.to_string()))?;
        }
        let verify_interval = r.verify_interval_ms.unwrap_or(DEFAULT_VERIFY_INTERVAL);
        if verify_interval < Duration::from_secs(1) {
            return Err(err(
                "replication.verify_interval_ms",
                fmt_duration(verify_interval),
                "must be at least 1s".into(),
            ));
        }
        let flush_alarm = r.flush_alarm_ms.unwrap_or(DEFAULT_FLUSH_ALARM);
        if flush_alarm < Duration::from_secs(1) {
            return Err(err(
                "replication.flush_alarm_ms",
                fmt_duration(flush_alarm),
                "must be at least 1s".into(),
            ));
        }

        let q = self.queue;
        if let Some(h) = &q.post_ingest_hook {
            if h.is_empty() || h[0].trim().is_empty() {
                return Err(err(
                    "queue.post_ingest_hook",
                    format!("{h:?}"),
                    "must name a command, e.g. [\"postsuper\", \"-c\", \"/etc/postfix\", \"-s\"]"
                        .into(),
                ));
            }
        }
        let ledger_max_entries = match q.ledger_max_entries {
            None => 1_000_000,
            Some(n) if (1_000..=100_000_000).contains(&n) => n as usize,
            Some(n) => {
                return Err(err(
                    "queue.ledger_max_entries",
                    n.to_string(),
                    "must be between 1000 and 100000000".into(),
                ))
            }
        };
        let ledger_max_age = q
            .ledger_max_age_ms
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        if ledger_max_age < Duration::from_secs(3600) {
            return Err(err(
                "queue.ledger_max_age_ms",
                fmt_duration(ledger_max_age),
                "must be at least 1h: a replayed push must still find its record".into(),
            ));
        }

        let sync_interval = q.sync_interval_ms.unwrap_or(Duration::from_secs(60));
        if sync_interval < Duration::from_secs(1) || sync_interval > Duration::from_secs(3600) {
            return Err(err(
                "queue.sync_interval_ms",
                fmt_duration(sync_interval),
                "must be between 1s and 1h".into(),
            ));
        }
        let h = self.hooks;
        for (key, argv) in [
            ("hooks.on_primary", &h.on_primary),
            ("hooks.on_secondary", &h.on_secondary),
            ("hooks.on_failed", &h.on_failed),
            ("hooks.on_off", &h.on_off),
        ] {
            if let Some(argv) = argv {
                if argv.is_empty() || argv[0].trim().is_empty() {
                    return Err(err(
                        key,
                        format!("{argv:?}"),
                        "must name a command (an argv list, no shell), e.g. [\"/usr/share/hasync/hooks/postfix\", \"primary\"]"
                            .into(),
                    ));
                }
            }
        }
        let hook_timeout = h.timeout_ms.unwrap_or(Duration::from_secs(60));
        if hook_timeout < Duration::from_secs(1) || hook_timeout > Duration::from_secs(3600) {
            return Err(err(
                "hooks.timeout_ms",
                fmt_duration(hook_timeout),
                "must be between 1s and 1h".into(),
            ));
        }
        let switchover_timeout = h.switchover_timeout_ms.unwrap_or(Duration::from_secs(30));
        if switchover_timeout < Duration::from_secs(1)
            || switchover_timeout > Duration::from_secs(3600)
        {
            return Err(err(
                "hooks.switchover_timeout_ms",
                fmt_duration(switchover_timeout),
                "must be between 1s and 1h".into(),
            ));
        }
        let hooks = HooksConfig {
            on_primary: h.on_primary,
            on_secondary: h.on_secondary,
            on_failed: h.on_failed,
            on_off: h.on_off,
            timeout: hook_timeout,
            on_primary_failure: h.on_primary_failure,
            switchover_timeout,
        };
        let qr = self.quorum;
        let mut targets = Vec::new();
        for (i, t) in qr.targets.iter().enumerate() {
            let key = format!("quorum.targets[{i}]");
            let target: crate::quorum::Target =
                t.parse().map_err(|p: String| err(&key, quote(t), p))?;
            let ip = match target {
                crate::quorum::Target::Icmp(ip) => ip,
                crate::quorum::Target::Tcp(a) => a.ip(),
            };
            if ip == link.peer.ip() || link.paths.iter().any(|p| p.peer.ip() == ip) {
                return Err(err(
                    &key,
                    quote(t),
                    "is the peer: a target must be something both nodes reach apart from each other (the gateway, a switch), or it cannot tell a dead peer from a cut link".into(),
                ));
            }
            if ip == link.listen.ip() {
                return Err(err(&key, quote(t), "is this node's own address".into()));
            }
            if targets.contains(&target) {
                return Err(err(&key, quote(t), "is listed twice".into()));
            }
            targets.push(target);
        }
        match qr.mode {
            QuorumMode::Ping if targets.is_empty() => {
                return Err(err(
                    "quorum.targets",
                    "[]".into(),
                    "mode = \"ping\" needs at least one target (better three: a majority must be reachable)".into(),
                ))
            }
            QuorumMode::Etcd | QuorumMode::None if !targets.is_empty() => {
                return Err(err(
                    "quorum.targets",
                    format!("{} targets", targets.len()),
                    "apply only with mode = \"ping\"".into(),
                ))
            }
            _ => {}
        }
        let quorum_interval = qr.interval_ms.unwrap_or(
            link.heartbeat_interval
                .clamp(Duration::from_millis(50), Duration::from_secs(10)),
        );
        if quorum_interval < Duration::from_millis(50) || quorum_interval > Duration::from_secs(10)
        {
            return Err(err(
                "quorum.interval_ms",
                fmt_duration(quorum_interval),
                "must be between 50ms and 10s".into(),
            ));
        }
        if qr.mode != QuorumMode::Etcd
            && (!qr.endpoints.is_empty() || qr.key.is_some() || qr.lease_ttl_ms.is_some())
        {
            return Err(err(
                "quorum.endpoints",
                format!("{:?}", qr.endpoints),
                "endpoints, key and lease_ttl_ms apply only with mode = \"etcd\"".into(),
            ));
        }
        if qr.mode == QuorumMode::Etcd {
            if !cfg!(feature = "etcd") {
                return Err(err(
                    "quorum.mode",
                    quote("etcd"),
                    "this build of hasync has no etcd support (cargo feature \"etcd\")".into(),
                ));
            }
            if qr.endpoints.is_empty() {
                return Err(err(
                    "quorum.endpoints",
                    "[]".into(),
                    "mode = \"etcd\" needs the cluster's client URLs, e.g. [\"http://10.0.0.5:2379\"]".into(),
                ));
            }
            for (i, e) in qr.endpoints.iter().enumerate() {
                if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() > 256 {
                    return Err(err(
                        &format!("quorum.endpoints[{i}]"),
                        quote(e),
                        "must be an http:// or https:// URL".into(),
                    ));
                }
            }
        }
        let detection = link.heartbeat_interval * link.heartbeat_lost_threshold;
        let lease_ttl = qr
            .lease_ttl_ms
            .unwrap_or_else(|| (detection * 3).max(Duration::from_secs(5)));
        // etcd counts TTLs in whole seconds.
        let lease_ttl =
            Duration::from_secs(lease_ttl.as_secs() + u64::from(lease_ttl.subsec_nanos() > 0));
        if qr.mode == QuorumMode::Etcd
            && (lease_ttl < Duration::from_secs(2)
                || lease_ttl < detection * 2
                || lease_ttl > Duration::from_secs(300))
        {
            return Err(err(
                "quorum.lease_ttl_ms",
                fmt_duration(lease_ttl),
                format!(
                    "must be at least 2s and twice the failure detection time ({}), at most 5m",
                    fmt_duration(detection)
                ),
            ));
        }
        let key = match qr.key {
            Some(k) if k.is_empty() || k.len() > 512 || k.contains('\0') => {
                return Err(err(
                    "quorum.key",
                    quote(&k),
                    "must be 1 to 512 bytes, no NUL".into(),
                ))
            }
            Some(k) => k,
            None => {
                let mut names = [self.node_name.to_lowercase(), link.peer_name.to_lowercase()];
                names.sort();
                format!("/hasync/{}-{}/primary", names[0], names[1])
            }
        };
        let quorum = QuorumConfig {
            mode: qr.mode,
            targets,
            interval: quorum_interval,
            endpoints: qr.endpoints,
            key,
            lease_ttl,
        };
        if self.vip.len() > VIPS_MAX {
            return Err(err(
                "vip",
                format!("{} addresses", self.vip.len()),
                format!("at most {VIPS_MAX}"),
            ));
        }
        let mut vips: Vec<crate::vip::VipSpec> = Vec::new();
        for (i, v) in self.vip.iter().enumerate() {
            let key = |k: &str| format!("vip[{i}].{k}");
            let (address, prefix) = crate::vip::parse_cidr(&v.address)
                .map_err(|p| err(&key("address"), quote(&v.address), p))?;
            if v.interface.is_empty()
                || v.interface.len() > 15
                || v.interface.contains(['/', '\0'])
                || v.interface == "."
                || v.interface == ".."
            {
                return Err(err(
                    &key("interface"),
                    quote(&v.interface),
                    "is not an interface name (1 to 15 bytes, no '/')".into(),
                ));
            }
            if address == link.listen.ip()
                || address == link.peer.ip()
                || link
                    .paths
                    .iter()
                    .any(|p| p.listen.ip() == address || p.peer.ip() == address)
            {
                return Err(err(
                    &key("address"),
                    quote(&v.address),
                    "is a heartbeat address: the service address must be one that moves between the nodes".into(),
                ));
            }
            if vips.iter().any(|o| o.address == address) {
                return Err(err(
                    &key("address"),
                    quote(&v.address),
                    "is listed twice".into(),
                ));
            }
            vips.push(crate::vip::VipSpec {
                address,
                prefix,
                interface: v.interface.clone(),
            });
        }
        let metrics_listen = self.metrics.as_ref().map(|m| m.listen);
        if let Some(m) = metrics_listen {
            let taken = std::iter::once(link.listen)
                .chain(link.paths.iter().map(|p| p.listen))
                .chain(std::iter::once(sync_listen));
            for t in taken {
                if t.port() == m.port()
                    && (t.ip() == m.ip() || t.ip().is_unspecified() || m.ip().is_unspecified())
                {
                    return Err(err(
                        "metrics.listen",
                        m.to_string(),
                        format!("collides with {t}, which hasync already listens on"),
                    ));
                }
            }
        }
        let config = Config {
            metrics_listen,
            vips,
            quorum,
            hooks,
            queue: QueueConfig {
                sync_interval,
                commit_timeout: q.commit_timeout_ms.unwrap_or(Duration::from_secs(2)),
                sync: q.sync,
                layout: q.layout,
                post_ingest_hook: q.post_ingest_hook,
                ledger_max_entries,
                ledger_max_age,
            },
            replication: ReplicationConfig {
                sync_listen,
                sync_peer,
                exclude,
                verify_interval,
                flush_alarm,
                durability: r.durability,
                zero_copy: r.zero_copy.unwrap_or(true),
                allow_special_modes: r.allow_special_modes.unwrap_or(false),
                watch_foreign_writes: r.watch_foreign_writes.unwrap_or(true),
            },
            node_name: self.node_name,
            priority,
            state_dir,
            queue_dir,
            recovery: self.recovery,
            tie_break: self.tie_break,
            link,
            mailstores,
            mailstore_kinds,
            source: source.to_path_buf(),
            internal_dirs: BTreeMap::new(),
        };

        let synced: Vec<(String, PathBuf)> = config
            .synced_dirs()
            .map(|(key, path)| (key, path.to_path_buf()))
            .collect();
        check_overlap(&synced, "").map_err(|(key, value, problem)| err(&key, value, problem))?;
        check_state_dir(&config.state_dir, &synced, "")
            .map_err(|(key, value, problem)| err(&key, value, problem))?;
        let socket = crate::daemon::control::socket_path(&config.state_dir);
        if socket.as_os_str().len() > SOCKET_PATH_MAX {
            return Err(err(
                "state_dir",
                quote_path(&config.state_dir),
                format!(
                    "the control socket {} would be {} bytes long; a unix socket path holds at most {SOCKET_PATH_MAX}: choose a shorter state_dir",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            ));
        }
        let mut config = config;
        for (name, path) in self.internal_dirs {
            let key = format!("internal_dirs.{name}");
            if name != QUEUE_INTERNAL && !config.mailstores.contains_key(&name) {
                return Err(err(
                    &key,
                    quote_path(&path),
                    format!("names no mailstore (nor \"{QUEUE_INTERNAL}\")"),
                ));
            }
            let resolved =
                resolve_path(&base, &key, &path).map_err(|p| err(&key, quote_path(&path), p))?;
            config.internal_dirs.insert(name, resolved);
        }
        for (name, dir) in config.internal_layout() {
            let key = format!("internal_dirs.{name}");
            check_internal(&dir, &synced, "").map_err(|p| err(&key, quote_path(&dir), p))?;
        }

        Ok(config)
    }
}

impl RawLink {
    fn validate(
        self,
        source: &Path,
        base: &Path,
        node_name: &str,
    ) -> Result<LinkConfig, ConfigError> {
        let err = |key: &str, value: String, problem: String| invalid(source, key, value, problem);

        check_address(&self.listen, false)
            .map_err(|p| err("link.listen", self.listen.to_string(), p))?;
        check_address(&self.peer, true).map_err(|p| err("link.peer", self.peer.to_string(), p))?;
        if self.peer == self.listen {
            return Err(err(
                "link.peer",
                self.peer.to_string(),
                "peer equals self: same address as link.listen".to_string(),
            ));
        }

        check_name("peer_name", &self.peer_name)
            .map_err(|p| err("link.peer_name", quote(&self.peer_name), p))?;
        if self.peer_name.eq_ignore_ascii_case(node_name) {
            return Err(err(
                "link.peer_name",
                quote(&self.peer_name),
                "peer equals self: same as node_name (names are compared case-insensitively)"
                    .to_string(),
            ));
        }

        let secret_file = resolve_path(base, "link.secret_file", &self.secret_file)
            .map_err(|p| err("link.secret_file", quote_path(&self.secret_file), p))?;

        let interval = self
            .heartbeat_interval_ms
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        if interval < HEARTBEAT_INTERVAL_MIN || interval > HEARTBEAT_INTERVAL_MAX {
            return Err(err(
                "link.heartbeat_interval_ms",
                fmt_duration(interval),
                format!(
                    "must be between {} and {}",
                    fmt_duration(HEARTBEAT_INTERVAL_MIN),
                    fmt_duration(HEARTBEAT_INTERVAL_MAX)
                ),
            ));
        }

        let threshold_raw = self
            .heartbeat_lost_threshold
            .unwrap_or(i64::from(DEFAULT_HEARTBEAT_LOST_THRESHOLD));
        let threshold_err = |problem: String| {
            err(
                "link.heartbeat_lost_threshold",
                threshold_raw.to_string(),
                problem,
            )
        };
        if threshold_raw < 1 {
            return Err(threshold_err("must be at least 1".to_string()));
        }
        if threshold_raw > i64::from(HEARTBEAT_LOST_THRESHOLD_MAX) {
            return Err(threshold_err(format!(
                "must be at most {HEARTBEAT_LOST_THRESHOLD_MAX}"
            )));
        }
        // In 1..=1000 now, so the conversion cannot fail.
        let threshold = u32::try_from(threshold_raw).unwrap_or(HEARTBEAT_LOST_THRESHOLD_MAX);

        let (startup_wait, defaulted) = match self.startup_wait_ms {
            Some(wait) => (wait, false),
            None => (
                interval
                    .checked_mul(threshold.saturating_mul(2))
                    .unwrap_or(Duration::MAX),
                true,
            ),
        };
        let startup_value = if defaulted {
            format!(
                "{} (default: 2 x heartbeat_lost_threshold x heartbeat_interval_ms)",
                fmt_duration(startup_wait)
            )
        } else {
            fmt_duration(startup_wait)
        };
        if startup_wait < interval {
            return Err(err(
                "link.startup_wait_ms",
                startup_value,
                format!(
                    "must be at least link.heartbeat_interval_ms ({})",
                    fmt_duration(interval)
                ),
            ));
        }
        if startup_wait > STARTUP_WAIT_MAX {
            let hint = if defaulted {
                "; set link.startup_wait_ms explicitly or shorten the interval/threshold"
            } else {
                ""
            };
            return Err(err(
                "link.startup_wait_ms",
                startup_value,
                format!("must be at most {}{hint}", fmt_duration(STARTUP_WAIT_MAX)),
            ));
        }

        if self.paths.len() > EXTRA_PATHS_MAX {
            return Err(err(
                "link.paths",
                format!("{} paths", self.paths.len()),
                format!("at most {EXTRA_PATHS_MAX} paths besides link.listen/link.peer"),
            ));
        }
        let mut listens = vec![self.listen];
        let mut peers = vec![self.peer];
        for (i, p) in self.paths.iter().enumerate() {
            let key = |k: &str| format!("link.paths[{i}].{k}");
            check_address(&p.listen, false)
                .map_err(|e| err(&key("listen"), p.listen.to_string(), e))?;
            check_address(&p.peer, true).map_err(|e| err(&key("peer"), p.peer.to_string(), e))?;
            if listens.contains(&p.listen) {
                return Err(err(
                    &key("listen"),
                    p.listen.to_string(),
                    "already used by another heartbeat path: each path needs its own address"
                        .into(),
                ));
            }
            if peers.contains(&p.peer) || p.peer == p.listen {
                return Err(err(
                    &key("peer"),
                    p.peer.to_string(),
                    "already used by another heartbeat path (or this node's own listen address)"
                        .into(),
                ));
            }
            listens.push(p.listen);
            peers.push(p.peer);
        }
        Ok(LinkConfig {
            listen: self.listen,
            peer: self.peer,
            peer_name: self.peer_name,
            secret_file,
            heartbeat_interval: interval,
            heartbeat_lost_threshold: threshold,
            startup_wait,
            paths: self.paths,
        })
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn invalid(source: &Path, key: &str, value: String, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        source_file: source.to_path_buf(),
        key: key.to_string(),
        value,
        problem: problem.into(),
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn quote_path(p: &Path) -> String {
    quote(&p.display().to_string())
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Dotted key for a mailstore; names that are not TOML bare keys are quoted.
fn mailstore_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        format!("mailstores.{name}")
    } else {
        format!("mailstores.{name:?}")
    }
}

/// Node, peer and mailstore names: 1..=64 bytes of `[A-Za-z0-9._-]`, and not
/// `.` or `..` (names may end up as path components).
fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{what} is {} bytes long; at most {NAME_BYTES_MAX} bytes are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} contains {c:?}; only letters A-Z a-z, digits 0-9, '.', '_' and '-' are allowed"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} must not be \".\" or \"..\""));
    }
    Ok(())
}

/// A listen address may be a wildcard; a peer address must be concrete. No
/// port may be 0.
fn check_address(addr: &SocketAddr, is_peer: bool) -> Result<(), String> {
    if addr.port() == 0 {
        return Err("port must not be 0".to_string());
    }
    if is_peer && addr.ip().is_unspecified() {
        return Err(
            "must be the address the peer listens on, not an unspecified (wildcard) address"
                .to_string(),
        );
    }
    Ok(())
}

/// The absolute directory of the configuration file, against which relative
/// paths are resolved.
fn config_base_dir(source: &Path) -> PathBuf {
    let parent = match source.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    normalize(&std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf()))
}

/// Resolves `path` against `base`, normalises it and insists on the result
/// being absolute. Returns the problem description on failure.
fn resolve_path(base: &Path, key: &str, path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err("path must not be empty".to_string());
    }
    let resolved = normalize(&base.join(path));
    if !resolved.is_absolute() {
        // Only possible when the current directory cannot be determined.
        return Err(format!(
            "{key} must be an absolute path (relative paths are resolved against the \
             directory of the config file, which could not be determined)"
        ));
    }
    Ok(resolved)
}

/// Lexical normalisation: drops `.` components and folds `..` into the
/// preceding component (never above the root).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() && !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The `internal_dirs` key of the queue push's staging (on `queue_dir`'s
/// filesystem).
pub const QUEUE_INTERNAL: &str = "queue";

/// The path itself or its nearest ancestor that exists.
fn nearest_existing(p: &Path) -> Option<&Path> {
    p.ancestors().find(|a| a.exists())
}

/// An internal directory must be outside every live tree, and hold none.
fn check_internal(dir: &Path, synced: &[(String, PathBuf)], note: &str) -> Result<(), String> {
    for (key, d) in synced {
        if dir.starts_with(d) {
            return Err(format!(
                "is inside {key} ({}){note}: hasync's own files must stay out of the live trees",
                quote_path(d)
            ));
        }
        if d.starts_with(dir) {
            return Err(format!("contains {key} ({}){note}", quote_path(d)));
        }
    }
    Ok(())
}

/// Longest path a unix socket address holds (`sun_path` is 108 bytes with
/// its terminating NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// `state_dir` holds hasync's own files (epoch, indexes, ledger, the queue
/// replica): it must not be, or be inside, a replicated directory (they
/// would be replicated and rewritten by the peer), nor contain one.
fn check_state_dir(
    state: &Path,
    dirs: &[(String, PathBuf)],
    note: &str,
) -> Result<(), (String, String, String)> {
    for (key, d) in dirs {
        let relation = if d == state {
            "is the same directory as"
        } else if state.starts_with(d) {
            "is inside"
        } else if d.starts_with(state) {
            "contains"
        } else {
            continue;
        };
        return Err((
            "state_dir".to_string(),
            quote_path(state),
            format!(
                "{relation} {key} ({}){note}; hasync's own state must be kept apart from the replicated directories",
                quote_path(d)
            ),
        ));
    }
    Ok(())
}

/// No two synchronised directories may be the same or nested in one another.
/// On failure returns (key, value, problem) for the inner (or later) one.
fn check_overlap(dirs: &[(String, PathBuf)], note: &str) -> Result<(), (String, String, String)> {
    for (i, (key_a, a)) in dirs.iter().enumerate() {
        for (key_b, b) in &dirs[i + 1..] {
            let (inner_key, inner, outer_key, outer, relation) = if a == b {
                (key_b, b, key_a, a, "is the same directory as")
            } else if b.starts_with(a) {
                (key_b, b, key_a, a, "is nested inside")
            } else if a.starts_with(b) {
                (key_a, a, key_b, b, "is nested inside")
            } else {
                continue;
            };
            return Err((
                inner_key.clone(),
                quote_path(inner),
                format!(
                    "{relation} {outer_key} ({}){note}; queue_dir and the mailstores must be \
                     distinct directories that are not nested in one another",
                    quote_path(outer)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../fixtures/hasync.example.toml");

    const BASE: &str = r#"
node_name = "mx1"
priority = 100
state_dir = "/var/lib/hasync"
queue_dir = "/var/spool/postfix"

[link]
listen = "127.0.0.1:7401"
peer = "127.0.0.1:7402"
peer_name = "mx2"
secret_file = "/etc/hasync/link.secret"
"#;

    fn src() -> &'static Path {
        Path::new("/etc/hasync/hasync.toml")
    }

    /// BASE with each `from` replaced by `to` (each `from` must occur).
    fn edited(edits: &[(&str, &str)]) -> String {
        let mut text = BASE.to_string();
        for (from, to) in edits {
            assert!(text.contains(from), "test bug: {from:?} not in BASE");
            text = text.replacen(from, to, 1);
        }
        text
    }

    fn parse_ok(text: &str) -> Config {
        match Config::parse(text, src()) {
            Ok(c) => c,
            Err(e) => panic!("expected success, got: {e}"),
        }
    }

    /// Parses `text`, expects an Invalid error and returns (key, display).
    #[test]
    fn a_mailstore_can_be_a_dovecot_maildir_with_a_uid_margin() {
        let c = Config::parse(
            &format!(
                "{BASE}\n[mailstores]\nplain = \"/srv/a\"\nmail = {{ path = \"/var/vmail\", kind = \"dovecot-maildir\" }}\nother = {{ path = \"/srv/b\", kind = \"dovecot-maildir\", uid_margin = 50 }}\n"
            ),
            src(),
        )
        .unwrap();
        assert_eq!(c.mailstores.len(), 3);
        assert_eq!(c.mailstores["mail"], Path::new("/var/vmail"));
        assert_eq!(
            c.mailstore_kinds["mail"],
            StoreKind::DovecotMaildir { uid_margin: 1000 }
        );
        assert_eq!(
            c.mailstore_kinds["other"],
            StoreKind::DovecotMaildir { uid_margin: 50 }
        );
        assert!(!c.mailstore_kinds.contains_key("plain"));
        let (key, _) = parse_invalid(&format!(
            "{BASE}\n[mailstores]\nm = {{ path = \"/x\", uid_margin = 5 }}\n"
        ));
        assert_eq!(key, "mailstores.m.uid_margin");
        for bad in [
            "m = { path = \"/x\", kind = \"bogus\" }",
            "m = { path = \"/x\", kind = \"dovecot-maildir\", uid_margn = 5 }",
            "m = { kind = \"dovecot-maildir\" }",
            "m = 5",
        ] {
            let e = Config::parse(&format!("{BASE}\n[mailstores]\n{bad}\n"), src())
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("bogus") || e.contains("uid_margn") || e.contains("path"),
                "{bad}: {e}"
            );
        }
    }

    fn parse_invalid(text: &str) -> (String, String) {
        match Config::parse(text, src()) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let msg = e.to_string();
                let ConfigError::Invalid { key, .. } = e else {
                    unreachable!()
                };
                (key, msg)
            }
            Err(other) => panic!("expected an Invalid error, got: {other}"),
            Ok(c) => panic!("expected an error, got: {c:?}"),
        }
    }

    fn parse_syntax_err(text: &str) -> String {
        match Config::parse(text, src()) {
            Err(e @ ConfigError::Parse { .. }) => e.to_string(),
            Err(other) => panic!("expected a Parse error, got: {other}"),
            Ok(c) => panic!("expected an error, got: {c:?}"),
        }
    }

    #[test]
    fn example_fixture_parses() {
        let c = parse_ok(EXAMPLE);
        assert_eq!(c.node_name, "mx1");
        assert_eq!(c.priority, 100);
        assert_eq!(c.state_dir, Path::new("/var/lib/hasync"));
        assert_eq!(c.queue_dir, Path::new("/var/spool/postfix"));
        assert_eq!(c.recovery, RecoveryPolicy::BecomeSecondary);
        assert_eq!(c.tie_break, TieBreak::LowerName);
        assert_eq!(c.link.listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.link.peer, "127.0.0.1:7402".parse().unwrap());
        assert_eq!(c.link.peer_name, "mx2");
        assert_eq!(c.link.secret_file, Path::new("/etc/hasync/link.secret"));
        assert_eq!(c.link.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(c.link.heartbeat_lost_threshold, 5);
        assert_eq!(c.link.startup_wait, Duration::from_secs(2));
        assert_eq!(c.detection_time(), Duration::from_secs(1));
        assert_eq!(c.replication.durability, crate::model::Durability::Syncfs);
        let stores: Vec<(&str, &Path)> = c
            .mailstores
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_path()))
            .collect();
        assert_eq!(
            stores,
            [
                ("archive", Path::new("/var/archive")),
                ("inbox", Path::new("/var/vmail")),
                ("quarantine", Path::new("/var/quarantine")),
            ]
        );
        assert_eq!(c.source, src());
    }

    #[test]
    fn defaults_apply_when_omitted() {
        let c = parse_ok(BASE);
        assert_eq!(c.link.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(c.link.heartbeat_lost_threshold, 5);
        assert_eq!(c.link.startup_wait, Duration::from_secs(2));
        assert_eq!(c.recovery, RecoveryPolicy::default());
        assert_eq!(c.tie_break, TieBreak::default());
        assert!(c.mailstores.is_empty());
        assert!(c.mailstore_kinds.is_empty());
    }

    #[test]
    fn default_startup_wait_follows_interval_and_threshold() {
        let c = parse_ok(&format!(
            "{BASE}heartbeat_interval_ms = \"1s\"\nheartbeat_lost_threshold = 3\n"
        ));
        assert_eq!(c.link.startup_wait, Duration::from_secs(6));
        assert_eq!(c.detection_time(), Duration::from_secs(3));
    }

    #[test]
    fn duration_string_and_integer_both_accepted() {
        let a = parse_ok(&format!("{BASE}heartbeat_interval_ms = \"200ms\"\n"));
        let b = parse_ok(&format!("{BASE}heartbeat_interval_ms = 200\n"));
        assert_eq!(a.link.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(a, b);
        let c = parse_ok(&format!("{BASE}startup_wait_ms = \"1m 30s\"\n"));
        assert_eq!(c.link.startup_wait, Duration::from_secs(90));
        let d = parse_ok(&format!("{BASE}startup_wait_ms = 1500\n"));
        assert_eq!(d.link.startup_wait, Duration::from_millis(1500));
    }

    #[test]
    fn enums_parse_kebab_case() {
        let c = parse_ok(&edited(&[(
            "queue_dir = \"/var/spool/postfix\"\n",
            "queue_dir = \"/var/spool/postfix\"\nrecovery = \"restore-role\"\ntie_break = \"higher-name\"\n",
        )]));
        assert_eq!(c.recovery, RecoveryPolicy::RestoreRole);
        assert_eq!(c.tie_break, TieBreak::HigherName);

        let msg = parse_syntax_err(&edited(&[(
            "queue_dir = \"/var/spool/postfix\"\n",
            "queue_dir = \"/var/spool/postfix\"\nrecovery = \"sometimes\"\n",
        )]));
        assert!(msg.contains("sometimes"), "{msg}");
        assert!(msg.contains("become-secondary"), "{msg}");
    }

    #[test]
    fn replication_durability_defaults_to_syncfs_and_names_bad_values() {
        assert_eq!(
            parse_ok(BASE).replication.durability,
            crate::model::Durability::Syncfs
        );
        let c = parse_ok(&format!("{BASE}\n[replication]\ndurability = \"fsync\"\n"));
        assert_eq!(c.replication.durability, crate::model::Durability::Fsync);
        let msg = parse_syntax_err(&format!(
            "{BASE}\n[replication]\ndurability = \"fdatasync\"\n"
        ));
        assert!(msg.contains("fdatasync"), "{msg}");
        assert!(msg.contains("syncfs"), "{msg}");
    }

    #[test]
    fn zero_copy_defaults_on_and_must_be_a_boolean() {
        assert!(parse_ok(BASE).replication.zero_copy);
        let c = parse_ok(&format!("{BASE}\n[replication]\nzero_copy = false\n"));
        assert!(!c.replication.zero_copy);
        let msg = parse_syntax_err(&format!("{BASE}\n[replication]\nzero_copy = \"yes\"\n"));
        assert!(msg.contains("zero_copy"), "{msg}");
    }

    #[test]
    fn unknown_key_reports_line_and_key() {
        // "foo" is on line 4 (BASE starts with a newline).
        let text = BASE.replacen("priority = 100\n", "priority = 100\nfoo = 1\n", 1);
        let msg = parse_syntax_err(&text);
        assert!(msg.starts_with("/etc/hasync/hasync.toml: "), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(msg.contains("unknown field `foo`"), "{msg}");

        // A typo inside [link]: the key is `heartbeat_interval_ms`.
        let msg = parse_syntax_err(&format!("{BASE}heartbeat_interval = 200\n"));
        assert!(msg.contains("line 12"), "{msg}");
        assert!(msg.contains("unknown field `heartbeat_interval`"), "{msg}");
    }

    #[test]
    fn missing_key_and_wrong_type_are_reported() {
        let msg = parse_syntax_err(&edited(&[("peer_name = \"mx2\"\n", "")]));
        assert!(msg.contains("missing field `peer_name`"), "{msg}");

        let msg = parse_syntax_err(&edited(&[("priority = 100", "priority = \"high\"")]));
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("invalid type"), "{msg}");

        let msg = parse_syntax_err(&edited(&[("\"127.0.0.1:7402\"", "\"mx2.example\"")]));
        assert!(msg.contains("line 9"), "{msg}");
        assert!(msg.contains("socket address"), "{msg}");
    }

    #[test]
    fn threshold_zero_is_rejected() {
        let (key, msg) = parse_invalid(&format!("{BASE}heartbeat_lost_threshold = 0\n"));
        assert_eq!(key, "link.heartbeat_lost_threshold");
        assert_eq!(
            msg,
            "/etc/hasync/hasync.toml: link.heartbeat_lost_threshold = 0: must be at least 1"
        );
        let (key, msg) = parse_invalid(&format!("{BASE}heartbeat_lost_threshold = 1001\n"));
        assert_eq!(key, "link.heartbeat_lost_threshold");
        assert!(msg.ends_with("= 1001: must be at most 1000"), "{msg}");
    }

    #[test]
    fn peer_equals_self_by_name() {
        let (key, msg) = parse_invalid(&edited(&[("peer_name = \"mx2\"", "peer_name = \"mx1\"")]));
        assert_eq!(key, "link.peer_name");
        assert!(
            msg.contains("link.peer_name = \"mx1\": peer equals self"),
            "{msg}"
        );
        let (key, _) = parse_invalid(&edited(&[("peer_name = \"mx2\"", "peer_name = \"MX1\"")]));
        assert_eq!(key, "link.peer_name");
    }

    #[test]
    fn peer_equals_self_by_address() {
        let (key, msg) = parse_invalid(&edited(&[("\"127.0.0.1:7402\"", "\"127.0.0.1:7401\"")]));
        assert_eq!(key, "link.peer");
        assert_eq!(
            msg,
            "/etc/hasync/hasync.toml: link.peer = 127.0.0.1:7401: \
             peer equals self: same address as link.listen"
        );
    }

    #[test]
    fn peer_address_must_be_concrete() {
        let (key, msg) = parse_invalid(&edited(&[("\"127.0.0.1:7402\"", "\"0.0.0.0:7402\"")]));
        assert_eq!(key, "link.peer");
        assert!(msg.contains("unspecified"), "{msg}");
        let (key, msg) = parse_invalid(&edited(&[("\"127.0.0.1:7401\"", "\"127.0.0.1:0\"")]));
        assert_eq!(key, "link.listen");
        assert!(msg.contains("port must not be 0"), "{msg}");
    }

    #[test]
    fn bad_names_are_rejected() {
        let (key, msg) = parse_invalid(&edited(&[("node_name = \"mx1\"", "node_name = \"mx 1\"")]));
        assert_eq!(key, "node_name");
        assert!(msg.contains("node_name = \"mx 1\""), "{msg}");
        assert!(msg.contains("contains ' '"), "{msg}");

        let (key, msg) = parse_invalid(&edited(&[("node_name = \"mx1\"", "node_name = \"\"")]));
        assert_eq!(key, "node_name");
        assert!(msg.contains("must not be empty"), "{msg}");

        let long = "a".repeat(65);
        let (key, msg) = parse_invalid(&edited(&[(
            "peer_name = \"mx2\"",
            &format!("peer_name = \"{long}\""),
        )]));
        assert_eq!(key, "link.peer_name");
        assert!(msg.contains("65 bytes"), "{msg}");

        // 64 bytes is fine.
        parse_ok(&edited(&[(
            "peer_name = \"mx2\"",
            &format!("peer_name = \"{}\"", "b".repeat(64)),
        )]));

        let (key, msg) = parse_invalid(&format!(
            "{BASE}\n[mailstores]\n\"in box\" = \"/var/vmail\"\n"
        ));
        assert_eq!(key, "mailstores.\"in box\"");
        assert!(msg.contains("mailstore name contains ' '"), "{msg}");

        let (key, _) = parse_invalid(&format!("{BASE}\n[mailstores]\n\"..\" = \"/var/vmail\"\n"));
        assert_eq!(key, "mailstores.\"..\"");
    }

    #[test]
    fn priority_out_of_range() {
        let (key, msg) = parse_invalid(&edited(&[("priority = 100", "priority = 256")]));
        assert_eq!(key, "priority");
        assert!(
            msg.ends_with("priority = 256: must be between 0 and 255"),
            "{msg}"
        );
        let (key, _) = parse_invalid(&edited(&[("priority = 100", "priority = -1")]));
        assert_eq!(key, "priority");
        assert_eq!(
            parse_ok(&edited(&[("priority = 100", "priority = 255")])).priority,
            255
        );
    }

    #[test]
    fn bad_duration_string_names_key_and_value() {
        let msg = parse_syntax_err(&format!("{BASE}heartbeat_interval_ms = \"2 fortnights\"\n"));
        assert!(msg.contains("link.heartbeat_interval_ms"), "{msg}");
        assert!(msg.contains("\"2 fortnights\""), "{msg}");
        assert!(msg.contains("not a valid duration"), "{msg}");
        assert!(msg.contains("line 12"), "{msg}");

        let msg = parse_syntax_err(&format!("{BASE}startup_wait_ms = -5\n"));
        assert!(msg.contains("link.startup_wait_ms = -5"), "{msg}");
        assert!(msg.contains("negative"), "{msg}");

        let msg = parse_syntax_err(&format!("{BASE}startup_wait_ms = 1.5\n"));
        assert!(msg.contains("link.startup_wait_ms"), "{msg}");
        assert!(msg.contains("floating point"), "{msg}");
    }

    #[test]
    fn interval_out_of_range() {
        let (key, msg) = parse_invalid(&format!("{BASE}heartbeat_interval_ms = 5\n"));
        assert_eq!(key, "link.heartbeat_interval_ms");
        assert!(msg.ends_with("= 5ms: must be between 10ms and 1m"), "{msg}");
        let (key, _) = parse_invalid(&format!("{BASE}heartbeat_interval_ms = \"61s\"\n"));
        assert_eq!(key, "link.heartbeat_interval_ms");
        parse_ok(&format!(
            "{BASE}heartbeat_interval_ms = 10\nstartup_wait_ms = 10\n"
        ));
        parse_ok(&format!(
            "{BASE}heartbeat_interval_ms = \"60s\"\nheartbeat_lost_threshold = 2\n"
        ));
    }

    #[test]
    fn flush_alarm_defaults_to_30s_and_is_at_least_1s() {
        let c = parse_ok(BASE);
        assert_eq!(c.replication.flush_alarm, DEFAULT_FLUSH_ALARM);
        let c = parse_ok(&format!("{BASE}\n[replication]\nflush_alarm_ms = \"2m\"\n"));
        assert_eq!(c.replication.flush_alarm, Duration::from_secs(120));
        let (key, msg) = parse_invalid(&format!(
            "{BASE}\n[replication]\nflush_alarm_ms = \"500ms\"\n"
        ));
        assert_eq!(key, "replication.flush_alarm_ms");
        assert!(msg.ends_with("= 500ms: must be at least 1s"), "{msg}");
    }

    #[test]
    fn startup_wait_bounds() {
        let (key, msg) = parse_invalid(&format!("{BASE}startup_wait_ms = \"100ms\"\n"));
        assert_eq!(key, "link.startup_wait_ms");
        assert!(
            msg.ends_with("= 100ms: must be at least link.heartbeat_interval_ms (200ms)"),
            "{msg}"
        );
        let (key, msg) = parse_invalid(&format!("{BASE}startup_wait_ms = \"11m\"\n"));
        assert_eq!(key, "link.startup_wait_ms");
        assert!(msg.ends_with("= 11m: must be at most 10m"), "{msg}");
        // The computed default is checked too, and the message says so.
        let (key, msg) = parse_invalid(&format!(
            "{BASE}heartbeat_interval_ms = \"60s\"\nheartbeat_lost_threshold = 10\n"
        ));
        assert_eq!(key, "link.startup_wait_ms");
        assert!(msg.contains("20m (default: 2 x"), "{msg}");
        assert!(msg.contains("set link.startup_wait_ms explicitly"), "{msg}");
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let text = edited(&[
            ("\"/var/lib/hasync\"", "\"state\""),
            ("\"/var/spool/postfix\"", "\"../../var/./spool/postfix/\""),
            ("\"/etc/hasync/link.secret\"", "\"link.secret\""),
        ]) + "\n[mailstores]\ninbox = \"./vmail\"\narchive = \"/srv/archive\"\n";
        let c = parse_ok(&text);
        assert_eq!(c.state_dir, Path::new("/etc/hasync/state"));
        assert_eq!(c.queue_dir, Path::new("/var/spool/postfix"));
        assert_eq!(c.link.secret_file, Path::new("/etc/hasync/link.secret"));
        assert_eq!(c.mailstores["inbox"], Path::new("/etc/hasync/vmail"));
        assert_eq!(c.mailstores["archive"], Path::new("/srv/archive"));

        let (key, msg) = parse_invalid(&edited(&[("\"/var/lib/hasync\"", "\"\"")]));
        assert_eq!(key, "state_dir");
        assert!(msg.contains("must not be empty"), "{msg}");
    }

    #[test]
    fn relative_config_path_gives_absolute_dirs() {
        let text = edited(&[("\"/var/lib/hasync\"", "\"state\"")]);
        let c = Config::parse(&text, Path::new("hasync.toml")).unwrap();
        assert!(c.state_dir.is_absolute());
        assert_eq!(c.state_dir, std::env::current_dir().unwrap().join("state"));
    }

    #[test]
    fn state_dir_apart_from_replicated_dirs_and_short_enough_for_the_socket() {
        let with_store = |state: &str| {
            edited(&[("state_dir = \"/var/lib/hasync\"", state)])
                + "\n[mailstores]\ninbox = \"/var/vmail\"\n"
        };
        let (key, msg) = parse_invalid(&with_store("state_dir = \"/var/vmail\""));
        assert_eq!(key, "state_dir");
        assert!(msg.contains("same directory as mailstores.inbox"), "{msg}");
        let (key, msg) = parse_invalid(&with_store("state_dir = \"/var/vmail/.state\""));
        assert_eq!(key, "state_dir");
        assert!(msg.contains("is inside"), "{msg}");
        let long = format!("state_dir = \"/{}\"", "s".repeat(100));
        let (key, msg) = parse_invalid(&edited(&[("state_dir = \"/var/lib/hasync\"", &long)]));
        assert_eq!(key, "state_dir");
        assert!(msg.contains("unix socket path"), "{msg}");
    }

    #[test]
    fn sync_port_clashes_blame_the_key_at_fault() {
        let with = |line: &str| {
            edited(&[(
                "secret_file = \"/etc/hasync/link.secret\"",
                &format!("secret_file = \"/etc/hasync/link.secret\"\n[replication]\n{line}"),
            )])
        };
        let (key, _) = parse_invalid(&with("sync_peer = \"127.0.0.1:7402\""));
        assert_eq!(key, "replication.sync_peer");
        let (key, _) = parse_invalid(&with("sync_listen = \"127.0.0.1:7401\""));
        assert_eq!(key, "replication.sync_listen");
    }

    #[test]
    fn nested_or_equal_dirs_are_rejected() {
        let (key, msg) = parse_invalid(&format!(
            "{BASE}\n[mailstores]\narchive = \"/var/spool/postfix/archive\"\n"
        ));
        assert_eq!(key, "mailstores.archive");
        assert!(
            msg.contains("mailstores.archive = \"/var/spool/postfix/archive\": is nested inside queue_dir (\"/var/spool/postfix\")"),
            "{msg}"
        );

        // Outer directory listed after the inner one: still the inner key.
        let (key, msg) = parse_invalid(&format!(
            "{BASE}\n[mailstores]\na = \"/srv/mail/a\"\nb = \"/srv/mail\"\n"
        ));
        assert_eq!(key, "mailstores.a");
        assert!(msg.contains("nested inside mailstores.b"), "{msg}");

        // Same path spelt differently.
        let (key, msg) = parse_invalid(&format!(
            "{BASE}\n[mailstores]\nspool = \"/var/spool/../spool/postfix/\"\n"
        ));
        assert_eq!(key, "mailstores.spool");
        assert!(msg.contains("is the same directory as queue_dir"), "{msg}");

        // Sibling with a common string prefix is fine.
        parse_ok(&format!(
            "{BASE}\n[mailstores]\nx = \"/var/spool/postfix2\"\n"
        ));
    }

    /// The keys the parser accepts in each table, from its own refusal of
    /// an unknown one ("expected one of `a`, `b`").
    fn accepted_keys(text: &str) -> Vec<String> {
        let e = Config::parse(text, src()).unwrap_err().to_string();
        let list = e
            .split("expected one of ")
            .nth(1)
            .or_else(|| e.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("no key list in: {e}"));
        let list = list.lines().next().unwrap();
        list.split(", ")
            .flat_map(|k| k.split(" or "))
            .map(|k| k.trim().trim_matches('`').to_string())
            .collect()
    }

    #[test]
    fn docs_config_lists_every_key() {
        let doc = include_str!("../docs/CONFIG.md");
        let link = "[link]\nlisten = \"127.0.0.1:7401\"\npeer = \"127.0.0.1:7402\"\npeer_name = \"mx2\"\nsecret_file = \"/etc/x\"\n";
        let top = "node_name = \"mx1\"\npriority = 100\nstate_dir = \"/s\"\nqueue_dir = \"/q\"\n";
        let mut expected: Vec<String> = Vec::new();
        expected.extend(accepted_keys(&format!("zz_unknown = 1\n{top}{link}")));
        let with = |prefix: &str, table: &str| -> Vec<String> {
            accepted_keys(&format!("{top}{link}{table}"))
                .into_iter()
                .map(|k| format!("{prefix}.{k}"))
                .collect()
        };
        expected.extend(
            accepted_keys(&format!("{top}{link}zz_unknown = 1\n"))
                .into_iter()
                .map(|k| format!("link.{k}")),
        );
        expected.extend(with("link.paths", "[[link.paths]]\nzz_unknown = 1\n"));
        for t in ["replication", "queue", "hooks", "quorum", "metrics"] {
            expected.extend(with(t, &format!("[{t}]\nzz_unknown = 1\n")));
        }
        expected.extend(with("vip", "[[vip]]\nzz_unknown = 1\n"));
        expected.extend(with(
            "mailstores.<name>",
            "[mailstores]\nm = { path = \"/m\", zz_unknown = 1 }\n",
        ));
        expected.push("mailstores.<name>".into());
        assert!(expected.len() > 40, "{expected:?}");
        for k in &expected {
            assert!(
                doc.contains(&format!("| `{k}` |")),
                "docs/CONFIG.md does not document `{k}`"
            );
        }
        // And nothing documented that the parser would refuse.
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let key = line[3..].split('`').next().unwrap();
            assert!(
                expected.iter().any(|k| k == key),
                "docs/CONFIG.md documents `{key}`, which the parser does not accept"
            );
        }
    }

    #[test]
    fn metrics_listen_must_not_take_a_port_hasync_uses() {
        let c = parse_ok(&format!("{BASE}\n[metrics]\nlisten = \"127.0.0.1:9437\"\n"));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9437".parse().unwrap()));
        let e = Config::parse(
            &format!("{BASE}\n[metrics]\nlisten = \"0.0.0.0:7402\"\n"),
            src(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("metrics.listen") && e.contains("collides"),
            "{e}"
        );
    }

    #[test]
    fn explain_states_the_quorum_paths_and_service_addresses() {
        let c = parse_ok(&format!(
            "{}\n[[link.paths]]\nlisten = \"192.0.2.1:7401\"\npeer = \"192.0.2.2:7401\"\n\n[quorum]\nmode = \"ping\"\ntargets = [\"192.0.2.254\", \"192.0.2.10:443\", \"192.0.2.253\"]\n\n[[vip]]\naddress = \"192.0.2.25/24\"\ninterface = \"eth0\"\n",
            BASE
        ));
        let text = c.explain();
        for needle in [
            "path 2               listen 192.0.2.1:7401, peer 192.0.2.2:7401",
            "ping: 3 target(s) (192.0.2.254, tcp 192.0.2.10:443, 192.0.2.253)",
            "reaches 2 of them",
            "Ping cannot decide when both nodes reach the targets",
            "192.0.2.25/24 on eth0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn explain_mentions_everything() {
        let c = parse_ok(EXAMPLE);
        let text = c.explain();
        for needle in [
            "/etc/hasync/hasync.toml",
            "mx1",
            "100",
            "lower-name",
            "(here: mx1)",
            "become-secondary",
            "127.0.0.1:7401",
            "mx2 at 127.0.0.1:7402",
            "/etc/hasync/link.secret",
            "200ms",
            "5 missed",
            "failover detection   1s",
            "startup wait         2s",
            "paths                one (a cut of this link alone",
            "mode                 none: a silent peer counts as dead",
            "/usr/share/hasync/hooks/postfix",
            "killed after 1m",
            "switchover limit     30s",
            "foreign writes       watched while secondary",
            "Service addresses: none",
            "/var/lib/hasync",
            "/var/spool/postfix",
            "Mailstores (3, synchronised)",
            "quarantine           /var/quarantine",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(parse_ok(BASE).explain().contains("Mailstores: none"));
    }

    // -- filesystem checks -------------------------------------------------

    struct Setup {
        dir: tempfile::TempDir,
        config: PathBuf,
    }

    /// A tempdir with `state/`, `spool/`, `vmail/`, a 32-byte secret and a
    /// config using relative paths. `edit` may rewrite the config text.
    fn setup(edit: impl FnOnce(String) -> String) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        for d in ["state", "spool", "vmail"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let secret = dir.path().join("link.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = edited(&[
            ("\"/var/lib/hasync\"", "\"state\""),
            ("\"/var/spool/postfix\"", "\"spool\""),
            ("\"/etc/hasync/link.secret\"", "\"link.secret\""),
        ]) + "\n[mailstores]\ninbox = \"vmail\"\n";
        let config = dir.path().join("hasync.toml");
        std::fs::write(&config, edit(text)).unwrap();
        Setup { dir, config }
    }

    #[test]
    fn a_secret_others_can_read_is_refused_naming_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let s = setup(|t| t);
        let secret = s.dir.path().join("link.secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "link.secret_file");
        assert!(
            msg.contains("mode 0644") && msg.contains("chmod 600"),
            "{msg}"
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(load_invalid(&s.config).0, "link.secret_file");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
        Config::load(&s.config).unwrap();
    }

    fn load_invalid(config: &Path) -> (String, String) {
        match Config::load(config) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let msg = e.to_string();
                let ConfigError::Invalid { key, .. } = e else {
                    unreachable!()
                };
                (key, msg)
            }
            Err(other) => panic!("expected an Invalid error, got: {other}"),
            Ok(c) => panic!("expected an error, got: {c:?}"),
        }
    }

    #[test]
    fn load_succeeds_on_valid_tree() {
        let s = setup(|t| t);
        let c = Config::load(&s.config).unwrap();
        assert_eq!(c.state_dir, s.dir.path().join("state"));
        assert_eq!(c.mailstores["inbox"], s.dir.path().join("vmail"));
        assert_eq!(
            c.read_secret().unwrap(),
            b"0123456789abcdef0123456789abcdef"
        );
        assert_eq!(c.source, s.config);
    }

    #[test]
    fn load_reports_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn missing_dir_is_reported_by_load() {
        let s = setup(|t| t.replace("\"spool\"", "\"missing\""));
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "queue_dir");
        let missing = s.dir.path().join("missing");
        assert!(
            msg.contains(&format!(
                "queue_dir = {:?}: directory does not exist",
                missing.display().to_string()
            )),
            "{msg}"
        );

        let s = setup(|t| t.replace("\"vmail\"", "\"gone\""));
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "mailstores.inbox");
        assert!(msg.contains("directory does not exist"), "{msg}");
    }

    #[test]
    fn state_dir_that_is_a_file_is_rejected() {
        let s = setup(|t| t.replace("\"state\"", "\"link.secret\""));
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "state_dir");
        assert!(msg.contains("exists but is not a directory"), "{msg}");
    }

    #[test]
    fn short_secret_is_rejected() {
        let s = setup(|t| t);
        // 15 bytes + CRLF: too short once the line ending is trimmed.
        std::fs::write(s.dir.path().join("link.secret"), "0123456789abcde\r\n").unwrap();
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "link.secret_file");
        assert!(msg.contains("secret is 15 bytes long"), "{msg}");
        assert!(msg.contains("at least 16 bytes"), "{msg}");
        assert!(
            !msg.contains("0123456789abcde\""),
            "secret must not be echoed: {msg}"
        );

        // Exactly 16 bytes after trimming \r\n is accepted.
        std::fs::write(s.dir.path().join("link.secret"), "0123456789abcdef\r\n").unwrap();
        let c = Config::load(&s.config).unwrap();
        assert_eq!(c.read_secret().unwrap(), b"0123456789abcdef");
    }

    #[test]
    fn missing_secret_is_rejected() {
        let s = setup(|t| t.replace("\"link.secret\"", "\"absent.secret\""));
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "link.secret_file");
        assert!(msg.contains("absent.secret"), "{msg}");
        assert!(msg.contains("secret file does not exist"), "{msg}");
    }

    #[test]
    fn symlinked_overlap_is_rejected_by_load() {
        let s = setup(|t| t + "alias = \"alias\"\n");
        std::os::unix::fs::symlink(s.dir.path().join("spool/sub"), s.dir.path().join("alias"))
            .unwrap();
        std::fs::create_dir(s.dir.path().join("spool/sub")).unwrap();
        let (key, msg) = load_invalid(&s.config);
        assert_eq!(key, "mailstores.alias");
        assert!(msg.contains("nested inside queue_dir"), "{msg}");
        assert!(msg.contains("after resolving symlinks"), "{msg}");
    }

    /// Every fixtures/bad/*.toml must fail `parse`, and the message must
    /// contain each string given on a `# expect: ...` line.
    #[test]
    fn bad_fixtures_fail_with_expected_messages() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            let expected: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("# expect: "))
                .collect();
            assert!(
                !expected.is_empty(),
                "{} has no `# expect:` line",
                path.display()
            );
            let msg = match Config::parse(&text, &path) {
                Ok(_) => panic!("{} parsed successfully", path.display()),
                Err(e) => e.to_string(),
            };
            for want in expected {
                assert!(
                    msg.contains(want),
                    "{}: {want:?} not in: {msg}",
                    path.display()
                );
            }
        }
        assert!(seen >= 5, "expected bad fixtures in {}", dir.display());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Any text, or the example with one line replaced by anything, is
        /// parsed or refused with an error naming the file, never a panic.
        #[test]
        fn any_config_text_parses_or_is_refused_naming_the_file(
            junk in "\\PC{0,200}",
            line in 0usize..60,
        ) {
            let _ = Config::parse(&junk, src());
            let mut lines: Vec<&str> = EXAMPLE.lines().collect();
            let at = line % lines.len();
            lines[at] = &junk;
            if let Err(e) = Config::parse(&lines.join("\n"), src()) {
                proptest::prop_assert!(e.to_string().contains("hasync.toml"), "{}", e);
            }
        }
    }
}
