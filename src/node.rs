//! Embedding hasync: one node of a pair inside an appliance's own process.
//!
//! This is the public API for appliance code; the modules behind it are
//! not. The `hasync run` daemon is this same node, run in the foreground
//! until a signal ([`Node::run_until_signal`]).
//!
//! ```
//! use std::path::Path;
//! use hasync::{Config, Node, Role};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let d = dir.path();
//! # for sub in ["state", "queue", "mail"] { std::fs::create_dir(d.join(sub))?; }
//! # std::fs::write(d.join("link.secret"), "a secret of at least 16 bytes\n")?;
//! # std::fs::set_permissions(d.join("link.secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
//! # let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
//! # let text = format!(
//! #     "node_name = \"mx1\"\npriority = 100\nstate_dir = \"state\"\nqueue_dir = \"queue\"\n\
//! #      [link]\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\npeer_name = \"mx2\"\n\
//! #      secret_file = \"link.secret\"\nheartbeat_interval_ms = 50\nstartup_wait_ms = 200\n\
//! #      [replication]\nsync_listen = \"127.0.0.1:{}\"\nsync_peer = \"127.0.0.1:{}\"\n\
//! #      [queue]\ncommit_timeout_ms = 100\n[mailstores]\ninbox = \"mail\"\n",
//! #     port(), port(), port(), port());
//! // A configuration as `hasync check-config` validates it.
//! let config = Config::parse(&text, &d.join("hasync.toml"))?;
//! let node = Node::start(config)?;
//!
//! // Follow the role: start the MTA when this node serves, stop it when
//! // it does not. Alone, the node waits for its peer, then serves.
//! let mut roles = node.roles();
//! let mut now = roles.current();
//! while now.role != Role::Primary {
//!     now = roles.wait_change().expect("the node runs");
//! }
//! println!("serving at epoch {}: {}", now.epoch, now.reason);
//!
//! // A queue file the MTA just wrote: durable on both nodes before the MTA
//! // answers "250 OK", or local-only (here: no peer) with why.
//! std::fs::write(d.join("mail/msg"), "Subject: hi\n\nbody\n")?;
//! let answer = node.commit(&d.join("mail/msg"))?;
//! assert!(answer.starts_with("local-only"), "{answer}");
//! node.notify(&d.join("mail/msg"))?;
//!
//! assert_eq!(node.status()?.mode, Role::Primary);
//! node.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! Calls block the calling thread (briefly; `commit` for up to
//! `queue.commit_timeout_ms`): from async code, call them through the
//! runtime's blocking pool.

use std::path::Path;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::Config;
pub use crate::daemon::control::Status;
pub use crate::daemon::RoleChange;
pub use crate::failover::Role;

use crate::daemon::control::{Request, Response};
use crate::daemon::{ControlMsg, DaemonError, Embedding};

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// It could not start (bad directories, ports taken, …).
    #[error(transparent)]
    Start(#[from] DaemonError),
    /// It has stopped (after an error it logged, or a shutdown).
    #[error("the node has stopped")]
    Stopped,
    /// It refused the request, and says why.
    #[error("{0}")]
    Refused(String),
    #[error("cannot start the node's thread: {0}")]
    Thread(std::io::Error),
}

/// A running node. Dropping it shuts the node down and waits, as
/// [`Node::shutdown`] does (which also reports how it ended).
pub struct Node {
    requests: mpsc::Sender<ControlMsg>,
    roles: watch::Receiver<RoleChange>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl Node {
    /// Starts the node on a thread of its own; returns once its ports are
    /// bound (or with why it could not start).
    pub fn start(config: Config) -> Result<Node, NodeError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (roles_tx, roles_rx) = watch::channel(RoleChange {
            role: Role::Negotiating,
            epoch: 0,
            reason: "starting".into(),
        });
        let embed = Embedding {
            ready: ready_tx,
            shutdown: shutdown_rx,
            roles: roles_tx,
        };
        let thread = std::thread::Builder::new()
            .name("hasync-node".into())
            .spawn(move || crate::daemon::run_with(config, Some(embed)))
            .map_err(NodeError::Thread)?;
        match ready_rx.recv() {
            Ok(requests) => Ok(Node {
                requests,
                roles: roles_rx,
                shutdown: Some(shutdown_tx),
                thread: Some(thread),
            }),
            // It ended before it was ready: its error says why.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(NodeError::Start(e)),
                Ok(Ok(())) | Err(_) => Err(NodeError::Stopped),
            },
        }
    }

    /// Runs a node in the foreground until SIGTERM or SIGINT: `hasync run`.
    pub fn run_until_signal(config: Config) -> Result<(), NodeError> {
        Ok(crate::daemon::run(config)?)
    }

    /// Role changes: the current one, and every change after it (a slow
    /// reader sees the latest, never a backlog). `Primary` arrives when the
    /// node is ready to serve (its epoch durable, a queue replica promoted,
    /// IMAP UIDs raised, service addresses up: when `on_primary` would run);
    /// `HandingOver` when a switchover starts (stop serving: the peer
    /// promotes once replication has drained), `Primary` again if it is
    /// abandoned; every other role at once.
    pub fn roles(&self) -> Roles {
        Roles {
            rx: self.roles.clone(),
        }
    }

    fn ask(&self, req: Request) -> Result<Response, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .blocking_send((req, tx))
            .map_err(|_| NodeError::Stopped)?;
        let resp = rx.blocking_recv().map_err(|_| NodeError::Stopped)?;
        if resp.ok {
            Ok(resp)
        } else {
            Err(NodeError::Refused(resp.error.unwrap_or_default()))
        }
    }

    /// What `hasync status --json` shows.
    pub fn status(&self) -> Result<Status, NodeError> {
        self.ask(Request::Status)?
            .status
            .ok_or_else(|| NodeError::Refused("no status in the answer".into()))
    }

    /// Zero-loss commit of a queue file: `replicated: …` once it is durable
    /// on both nodes, `local-only: …` (with why) after
    /// `queue.commit_timeout_ms` or without a peer.
    pub fn commit(&self, path: &Path) -> Result<String, NodeError> {
        let path = std::fs::canonicalize(path)
            .map_err(|e| NodeError::Refused(format!("{}: {e}", path.display())))?;
        Ok(self
            .ask(Request::Commit { path })?
            .message
            .unwrap_or_default())
    }

    /// The embedder changed `path` in a mailstore: on the primary it is
    /// sent at once (the tracker would see it too, a little later).
    pub fn notify(&self, path: &Path) -> Result<(), NodeError> {
        self.ask(Request::Notify {
            path: path.to_path_buf(),
        })
        .map(drop)
    }

    /// Stops the node as SIGTERM stops the daemon (a primary runs its
    /// `on_secondary` hook and releases its service addresses) and waits
    /// for it.
    pub fn shutdown(mut self) -> Result<(), NodeError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), NodeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(res)) => Ok(res?),
            Some(Err(_)) => Err(NodeError::Stopped),
            None => Ok(()),
        }
    }
}

/// A subscription to a node's role changes.
pub struct Roles {
    rx: watch::Receiver<RoleChange>,
}

impl Roles {
    /// The role now.
    pub fn current(&mut self) -> RoleChange {
        self.rx.borrow_and_update().clone()
    }

    /// Blocks until the role changes; `None` once the node has stopped.
    pub fn wait_change(&mut self) -> Option<RoleChange> {
        let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
        rt.block_on(self.rx.changed()).ok()?;
        Some(self.current())
    }

    /// For async code: the underlying `tokio::sync::watch` receiver.
    pub fn receiver(&self) -> watch::Receiver<RoleChange> {
        self.rx.clone()
    }
}

impl Drop for Node {
    /// Stops the node and waits for it, as [`Node::shutdown`] does (a
    /// primary runs `on_secondary` and releases its service addresses).
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
