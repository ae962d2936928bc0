//! Disk work the daemon's event loop hands off.
//!
//! The loop also carries the heartbeats: the link's tasks run on its
//! thread. A directory read or a `stat` there that waits on a busy or
//! failing disk would silence them, and the peer would take over from a
//! node that is only slow (both nodes at once, when they share a saturated
//! disk: a split brain). So the loop itself reads and writes nothing:
//! - the periodic self-check of the configured directories runs on a
//!   thread of its own ([`SelfChecks`]), and a check that does not return
//!   within [`SELF_CHECK_HUNG`] counts as failed;
//! - listing and restoring kept-aside versions (`hasync conflicts`), the
//!   conflicts summary that `hasync status` shows, and the note of the
//!   peer's epoch run on one chores thread ([`Chores`]), at most
//!   [`CHORES_QUEUED_MAX`] waiting.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Chores waiting for the chores thread at most; more are refused (the
/// request says the node is busy).
pub const CHORES_QUEUED_MAX: usize = 64;

/// A self-check that has not returned for this long counts as failed: the
/// node steps out (`failed`) and its peer takes over, as for a missing
/// directory. Shorter stalls of a busy disk only delay the next check.
pub const SELF_CHECK_HUNG: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// The chores thread: runs jobs in order, one at a time.
pub struct Chores {
    tx: crossbeam_channel::Sender<Job>,
}

/// The chores thread has [`CHORES_QUEUED_MAX`] jobs waiting already.
#[derive(Debug, thiserror::Error)]
#[error("the node is busy: {CHORES_QUEUED_MAX} disk chores are waiting already; try again")]
pub struct Busy;

impl Chores {
    /// Starts the thread; it ends once this handle is dropped and the jobs
    /// queued are done.
    pub fn start() -> std::io::Result<Chores> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(CHORES_QUEUED_MAX);
        std::thread::Builder::new()
            .name("hasync-chores".into())
            .spawn(move || {
                for job in rx {
                    // A job that panics loses its own answer, not the
                    // thread: later chores still run.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    if ran.is_err() {
                        tracing::error!("a daemon chore panicked; the next ones run");
                    }
                }
            })?;
        Ok(Chores { tx })
    }

    /// Whether a job would be refused now. Only the daemon's loop queues
    /// jobs, so one it finds room for is not refused.
    pub fn busy(&self) -> Option<Busy> {
        self.tx.is_full().then_some(Busy)
    }

    /// Queues `job`, or refuses it when too many wait.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        self.tx.try_send(Box::new(job)).map_err(|_| Busy)
    }
}

/// The self-check thread and what it reported last.
pub struct SelfChecks {
    rx: mpsc::Receiver<Result<(), String>>,
    /// When the last result arrived (or the checks started).
    last: Instant,
}

impl SelfChecks {
    /// Runs `check` every `every` on a thread of its own; the thread ends
    /// at its next result once this handle is dropped.
    pub fn start(
        every: Duration,
        check: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<SelfChecks> {
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("hasync-selfcheck".into())
            .spawn(move || loop {
                if tx.blocking_send(check()).is_err() {
                    return;
                }
                std::thread::sleep(every);
            })?;
        Ok(SelfChecks {
            rx,
            last: Instant::now(),
        })
    }

    /// The next result.
    pub async fn recv(&mut self) -> Option<Result<(), String>> {
        let r = self.rx.recv().await;
        self.last = Instant::now();
        r
    }

    /// A result already waiting (the loop was held up), without waiting.
    pub fn try_recv(&mut self) -> Option<Result<(), String>> {
        let r = self.rx.try_recv().ok()?;
        self.last = Instant::now();
        Some(r)
    }

    /// A check that has run for longer than [`SELF_CHECK_HUNG`] without a
    /// result: the failure to report.
    pub fn hung(&self, now: Instant) -> Option<String> {
        let waited = now.saturating_duration_since(self.last);
        (waited > SELF_CHECK_HUNG).then(|| {
            format!(
                "checking the configured directories has not returned for {} s (a hung disk?)",
                waited.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chores_run_in_order_and_refuse_beyond_the_bound() {
        let chores = Chores::start().unwrap();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
        // The first job holds the thread until the gate opens.
        let (running_tx, running_rx) = std::sync::mpsc::channel::<()>();
        chores
            .run(move || {
                running_tx.send(()).unwrap();
                gate_rx.recv().unwrap();
            })
            .unwrap();
        running_rx.recv().unwrap();
        assert!(chores.busy().is_none());
        let mut queued = 0;
        while queued < CHORES_QUEUED_MAX {
            let done = done_tx.clone();
            let i = queued;
            chores.run(move || done.send(i).unwrap()).unwrap();
            queued += 1;
        }
        assert!(chores.busy().is_some());
        assert!(chores.run(|| {}).is_err(), "one too many");
        gate_tx.send(()).unwrap();
        let order: Vec<usize> = (0..CHORES_QUEUED_MAX)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(order, (0..CHORES_QUEUED_MAX).collect::<Vec<_>>());
    }

    #[test]
    fn a_self_check_that_does_not_return_is_reported_hung() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
            let gate = std::sync::Mutex::new(gate_rx);
            let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = calls.clone();
            let mut checks = SelfChecks::start(Duration::from_millis(1), move || {
                // The second check hangs until the gate opens.
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    gate.lock().unwrap().recv().unwrap();
                }
                Err("simulated".into())
            })
            .unwrap();
            assert_eq!(checks.recv().await, Some(Err("simulated".into())));
            let t = checks.last;
            assert!(checks.hung(t + SELF_CHECK_HUNG / 2).is_none());
            let why = checks.hung(t + SELF_CHECK_HUNG * 2).unwrap();
            assert!(why.contains("has not returned for 20 s"), "{why}");
            gate_tx.send(()).unwrap();
            assert!(checks.recv().await.is_some());
        });
    }
}
