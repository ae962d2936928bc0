//! The systemd notify protocol (`Type=notify`): `READY=1` once the config
//! is valid and every port is bound, `STATUS=` with the role and epoch on
//! every change, `WATCHDOG=1` from the daemon's own loop (a stuck loop
//! misses it and systemd restarts the service), `STOPPING=1` on shutdown.
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// Variables of the protocol that commands started by hasync must not
/// inherit (a hook's daemon would otherwise talk to hasync's manager).
pub const INHERITED_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

pub struct Systemd {
    watchdog: Option<Duration>,
    failed_once: std::cell::Cell<bool>,
    /// Embedded, the process and its service manager are the embedder's.
    off: bool,
}

impl Systemd {
    pub fn from_env() -> Systemd {
        Systemd {
            watchdog: sd_notify::watchdog_enabled(),
            failed_once: std::cell::Cell::new(false),
            off: false,
        }
    }

    /// Says nothing to any service manager (an embedded node).
    pub fn disabled() -> Systemd {
        Systemd {
            watchdog: None,
            failed_once: std::cell::Cell::new(false),
            off: true,
        }
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog
            .map(|w| (w / 2).max(Duration::from_millis(10)))
    }

    fn send(&self, state: &[NotifyState]) {
        if self.off {
            return;
        }
        if let Err(e) = sd_notify::notify(state) {
            if !self.failed_once.replace(true) {
                warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}
