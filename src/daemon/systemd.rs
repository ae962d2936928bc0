//! The systemd notify protocol (`Type=notify`): `READY=1` once the config
//! is valid and every port is bound, `STATUS=` with the role and epoch on
//! every change, `WATCHDOG=1` from the daemon's own loop (a stuck loop
//! misses it and systemd restarts the service), `STOPPING=1` on shutdown.
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.
//!
//! Messages go out from a thread of their own (`hasync-notify`), in order:
//! a send to a manager that does not drain its socket blocks, and the
//! daemon's loop, which carries the heartbeats, must not wait for it. At
//! most [`NOTIFY_QUEUED_MAX`] wait; more are dropped (a stuck manager
//! misses watchdog pings either way). `STOPPING=1` is sent directly, the
//! loop having ended.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// Variables of the protocol that commands started by hasync must not
/// inherit (a hook's daemon would otherwise talk to hasync's manager).
pub const INHERITED_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Notifications waiting for the notify thread at most.
pub const NOTIFY_QUEUED_MAX: usize = 64;

/// One notification, owned (for the notify thread).
enum Note {
    Ready(String),
    Status(String),
    Watchdog,
}

pub struct Systemd {
    /// To the notify thread; `None` without `NOTIFY_SOCKET` or embedded.
    tx: Option<crossbeam_channel::Sender<Note>>,
    watchdog: Option<Duration>,
    failed_once: std::cell::Cell<bool>,
}

impl Systemd {
    pub fn from_env() -> Systemd {
        let tx = std::env::var_os("NOTIFY_SOCKET").and_then(|_| {
            let (tx, rx) = crossbeam_channel::bounded::<Note>(NOTIFY_QUEUED_MAX);
            let spawned = std::thread::Builder::new()
                .name("hasync-notify".into())
                .spawn(move || {
                    let mut failed = false;
                    for note in rx {
                        let res = match &note {
                            Note::Ready(st) => {
                                sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(st)])
                            }
                            Note::Status(st) => sd_notify::notify(&[NotifyState::Status(st)]),
                            Note::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                        };
                        if let Err(e) = res {
                            if !std::mem::replace(&mut failed, true) {
                                warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    warn!(
                        "cannot start the notify thread ({e}): the service manager hears nothing"
                    );
                    None
                }
            }
        });
        Systemd {
            tx,
            watchdog: sd_notify::watchdog_enabled(),
            failed_once: std::cell::Cell::new(false),
        }
    }

    /// Says nothing to any service manager (an embedded node).
    pub fn disabled() -> Systemd {
        Systemd {
            tx: None,
            watchdog: None,
            failed_once: std::cell::Cell::new(false),
        }
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog
            .map(|w| (w / 2).max(Duration::from_millis(10)))
    }

    /// Queues `note` for the notify thread (dropped when too many wait).
    fn queue(&self, note: Note) {
        if let Some(tx) = &self.tx {
            if tx.try_send(note).is_err() && !self.failed_once.replace(true) {
                warn!("the service manager does not take notifications: {NOTIFY_QUEUED_MAX} wait; later ones are dropped");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.queue(Note::Ready(status.to_string()));
    }

    pub fn status(&self, status: &str) {
        self.queue(Note::Status(status.to_string()));
    }

    pub fn watchdog(&self) {
        self.queue(Note::Watchdog);
    }

    /// Sent directly: the loop has ended, and the manager should hear it
    /// before the process exits.
    pub fn stopping(&self) {
        // Embedded or without `NOTIFY_SOCKET`: nobody to tell.
        if self.tx.is_none() {
            return;
        }
        if let Err(e) = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")])
        {
            warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
    }
}
