//! The io layer: every file operation the engine makes goes through here, on
//! tokio-uring, so that the runtime can be replaced (the raw io-uring crate,
//! or another runtime) without touching the engine. tokio-uring's own API is
//! safe; any `unsafe` the project needs (raw io_uring ops that tokio-uring
//! lacks, such as splice in [`splice`]) belongs in this module and nowhere
//! else.

pub mod fanotify;
pub mod handoff;
pub mod packet;
pub mod splice;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use tokio_uring::fs::{File, OpenOptions};

/// Replaces `dir/name` with `bytes` atomically and durably: write a
/// temporary file, fsync it, rename it over the target, fsync the directory
/// (a rename is durable only once its parent directory is). A crash at any
/// point leaves either the old or the new content, never a mix.
/// A failed attempt removes its temporary file (a full disk must not be
/// left fuller, nor a state directory littered with empty temp files).
pub async fn write_atomic(dir: &Path, name: &str, bytes: Vec<u8>) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let res = async {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .await?;
        let (res, _) = file.write_all_at(bytes, 0).await;
        if let Err(e) = res.and(file.sync_all().await) {
            let _ = file.close().await;
            return Err(e);
        }
        file.close().await?;
        tokio_uring::fs::rename(&tmp, &target).await
    }
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir).await
}

/// Removes temporary files an interrupted [`write_atomic`] or
/// [`write_atomic_with`] left in `dir` (`.<name>.tmp`); returns how many.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if name.starts_with(b".") && name.ends_with(b".tmp") && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// fsync a directory so that entries created or renamed in it are durable.
pub async fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir).await?;
    d.sync_all().await?;
    d.close().await
}

/// Blocking twin of [`write_atomic`] for callers outside the runtime's hot
/// path (index snapshots): same temp → fsync → rename → fsync-dir sequence.
pub fn write_atomic_blocking(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(target, |w| w.write_all(bytes))
}

/// Like [`write_atomic_blocking`], with the content produced by `fill`
/// straight into the (buffered) temporary file: a large index is streamed
/// to disk instead of being built in memory first.
pub fn write_atomic_with(
    target: &Path,
    fill: impl FnOnce(&mut dyn io::Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = target
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", target.display())))?;
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", target.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let res = (|| {
        let mut w = io::BufWriter::with_capacity(256 * 1024, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, target)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes the whole filesystem that holds `path` (data and metadata of
/// every file on it), and reports a writeback error that happened since the
/// descriptor was opened. Grouped durability: one call instead of an fsync
/// per file and per directory.
pub fn syncfs(path: &Path) -> io::Result<()> {
    syncfs_file(&std::fs::File::open(path)?)
}

/// [`syncfs`] through a descriptor the caller keeps open: it reports every
/// writeback error raised since its previous call (or since it was
/// opened), not only those since this call began.
pub fn syncfs_file(f: &std::fs::File) -> io::Result<()> {
    if crate::failpoint::fails("syncfs.eio") {
        return Err(io::Error::from_raw_os_error(5));
    }
    if crate::failpoint::fails("syncfs.slow_eio") {
        // A flush that outlives the session that asked for it (a test cuts
        // the connection meanwhile), then fails: after 3 s, or
        // `HASYNC_FAILPOINT_SLOW_MS`.
        let ms = std::env::var("HASYNC_FAILPOINT_SLOW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        eprintln!("hasync: failpoint syncfs.slow_eio reached: failing in {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
        return Err(io::Error::from_raw_os_error(5));
    }
    rustix::fs::syncfs(f).map_err(io::Error::from)
}

/// Binds a listening TCP socket, waiting out `EADDRINUSE` for up to
/// `patience`: when a process that used io_uring is killed, the kernel tears
/// its ring down asynchronously and a pending accept keeps the old listener
/// alive for a moment, so a restart right after a crash would otherwise fail.
pub fn bind_listener(
    addr: std::net::SocketAddr,
    patience: std::time::Duration,
) -> io::Result<std::net::TcpListener> {
    let start = std::time::Instant::now();
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && start.elapsed() < patience => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// A new descriptor (close-on-exec) for the file or socket `f` holds, to
/// hand to another thread while `f` stays with its owner.
pub fn dup_fd(f: &impl AsRawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `f` is borrowed for the whole call and owns its descriptor,
    // so the fd stays open while `fd` exists; `fd` does not outlive this
    // call (the duplicate is a descriptor of its own).
    let fd = unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) };
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

/// Bounds how long data written to TCP socket `s` may stay unacknowledged
/// before the kernel aborts the connection (`TCP_USER_TIMEOUT`). Without
/// it a connection through a cut link survives the cut in retransmission
/// backoff (which grows to minutes after repeated cuts), and writes into
/// it succeed into the send buffer while nothing arrives.
pub fn set_user_timeout(s: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    // SAFETY: `s` is borrowed for the whole call and owns its descriptor,
    // so the fd stays open while the borrow exists; it does not outlive
    // this call.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    let ms = u32::try_from(timeout.as_millis())
        .unwrap_or(u32::MAX)
        .max(1);
    Ok(rustix::net::sockopt::set_tcp_user_timeout(fd, ms)?)
}

/// Writes all of `buf` at `offset` with plain `pwrite` calls. The receiver
/// uses this for staged files instead of an io_uring write: ext4 has no
/// non-blocking buffered writes, so io_uring hands every such write to an
/// io-wq worker thread, and on the 2-core reference machine that hand-off
/// cost more CPU than the copy into the page cache (measured: 36% of the
/// receiver's CPU in io-wq workers at 1,000 messages/s).
pub fn pwrite_all(
    fd: std::os::fd::BorrowedFd<'_>,
    mut buf: &[u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(fd, buf, offset) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The outcome of a flush requested from [`DurableWorker`].
pub type FlushResult = Result<(), String>;

/// Told of a flush failure nobody waited for (see [`DurableWorker::start_with`]).
pub type OrphanHook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Flush failures whose requester had stopped waiting (its session ended
/// first): the last one is kept until someone takes it, because the
/// descriptor has seen the error and will not report it again, and each is
/// told to the hook at once.
#[derive(Clone, Default)]
pub struct Orphans {
    last: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    hook: Option<OrphanHook>,
}

impl Orphans {
    /// A flush failed (`why`) with nobody waiting for it.
    pub fn report(&self, why: String) {
        if let Some(hook) = &self.hook {
            hook(&why);
        }
        *self.last.lock().expect("orphaned flush lock") = Some(why);
    }

    /// The last failure reported, once.
    pub fn take(&self) -> Option<String> {
        self.last.lock().expect("orphaned flush lock").take()
    }
}

/// Work for the [`DurableWorker`]'s thread.
enum DurableJob {
    /// `syncfs` of the filesystems holding these paths, in order.
    Flush(
        Vec<std::path::PathBuf>,
        tokio::sync::oneshot::Sender<FlushResult>,
    ),
    /// A commit sequence of the caller's (the queue ingester's batch:
    /// intents, flush, renames, flush, ledger).
    Run(Box<dyn FnOnce() + Send>),
}

/// The node's durable-commit service: one thread, for the node's life,
/// that runs what makes data durable for the io_uring event loops, in the
/// order asked: the receiver's `syncfs` flushes (io_uring has no syncfs
/// operation, and one can take tens of milliseconds, during which the
/// loop must keep receiving and staging the next files) and the queue
/// ingester's batch commits. The loops hand the work over and hear the
/// outcome on a channel; only a push that finds a batch of a cut push
/// still committing waits for it (and for what was queued before it).
/// The thread ends when the last handle is dropped.
///
/// Each path's descriptor is opened once and kept for the worker's life:
/// `syncfs` reports the writeback errors raised since the descriptor last
/// saw them, so a descriptor opened per call would miss an error raised
/// between calls (by the kernel's background writeback) and a batch would
/// be called durable that is not.
#[derive(Clone)]
pub struct DurableWorker {
    tx: handoff::Sender<DurableJob>,
    /// Failures whose requester had stopped waiting (its session ended).
    orphans: Orphans,
}

impl DurableWorker {
    pub fn start(name: &str) -> io::Result<DurableWorker> {
        DurableWorker::start_with(name, None)
    }

    /// Like [`DurableWorker::start`]; `on_orphan` is also told at once, on
    /// the worker's thread, of a flush failure nobody waits for any more
    /// (the engine records it durably: the descriptor has seen the error
    /// and will not report it again, a new one only reports errors raised
    /// after it was opened, and a restart would forget one held in memory).
    pub fn start_with(name: &str, on_orphan: Option<OrphanHook>) -> io::Result<DurableWorker> {
        let (tx, rx) = handoff::channel::<DurableJob>();
        let orphans = Orphans {
            last: Default::default(),
            hook: on_orphan,
        };
        let reports = orphans.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut open: std::collections::HashMap<std::path::PathBuf, std::fs::File> =
                    Default::default();
                for job in rx {
                    let (paths, reply) = match job {
                        DurableJob::Flush(paths, reply) => (paths, reply),
                        DurableJob::Run(job) => {
                            // A job that panics has its own way out (the
                            // queue's aborts the process); the worker goes
                            // on serving the flushes.
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err()
                            {
                                tracing::error!("a job of the durable-commit thread panicked");
                            }
                            continue;
                        }
                    };
                    let res = paths.iter().try_for_each(|p| {
                        let f = match open.entry(p.clone()) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                                std::fs::File::open(p)
                                    .map_err(|e| format!("open {} to flush: {e}", p.display()))?,
                            ),
                        };
                        syncfs_file(f).map_err(|e| format!("syncfs of {}: {e}", p.display()))
                    });
                    if let Err(Err(why)) = reply.send(res) {
                        reports.report(why);
                    }
                }
            })?;
        Ok(DurableWorker { tx, orphans })
    }

    /// A flush failure nobody was waiting for any more, once.
    pub fn take_orphaned_failure(&self) -> Option<String> {
        self.orphans.take()
    }

    /// Where failures of flushes run elsewhere (io_uring fsyncs) that
    /// nobody waits for any more are reported, with this worker's own.
    pub fn orphans(&self) -> Orphans {
        self.orphans.clone()
    }

    /// Like [`DurableWorker::flush`], answering on `reply`.
    pub fn flush_with(
        &self,
        paths: Vec<std::path::PathBuf>,
        reply: tokio::sync::oneshot::Sender<FlushResult>,
    ) {
        if paths.is_empty() {
            let _ = reply.send(Ok(()));
        } else if let Err(handoff::Closed(DurableJob::Flush(_, reply))) =
            self.tx.send(DurableJob::Flush(paths, reply))
        {
            let _ = reply.send(Err("the durable-commit thread is gone".into()));
        }
    }

    /// Flushes the filesystems holding `paths`, in order; the receiver
    /// resolves once all are durable or one failed.
    pub fn flush(
        &self,
        paths: Vec<std::path::PathBuf>,
    ) -> tokio::sync::oneshot::Receiver<FlushResult> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.flush_with(paths, reply);
        rx
    }

    /// Runs `job` on the worker's thread after everything asked before it;
    /// its outcome comes back on the channel returned. Err(`job`) if the
    /// thread is gone (it ends only with its last handle, so not while
    /// this one exists, unless it could not run at all).
    pub fn run<T, F>(&self, job: F) -> Result<crossbeam_channel::Receiver<T>, String>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(DurableJob::Run(Box::new(move || {
                let _ = tx.send(job());
            })))
            .map_err(|_| "the durable-commit thread is gone".to_string())?;
        Ok(rx)
    }
}

/// Submits an fsync of `fd` to io_uring (then closes it); must be called on
/// a tokio-uring runtime.
pub fn fsync_owned(fd: std::os::fd::OwnedFd) -> tokio::task::JoinHandle<io::Result<()>> {
    let f = File::from_std(std::fs::File::from(fd));
    tokio_uring::spawn(async move {
        let r = f.sync_all().await;
        let _ = f.close().await;
        r
    })
}

/// Resolves once every fsync has finished, with the first error, if any;
/// an error nobody waits for any more goes to `orphans`.
pub fn join_fsyncs(
    pending: Vec<tokio::task::JoinHandle<io::Result<()>>>,
    orphans: Option<Orphans>,
) -> tokio::sync::oneshot::Receiver<FlushResult> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    tokio_uring::spawn(async move {
        let mut res = Ok(());
        for p in pending {
            let r = match p.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("fsync: {e}"),
                Err(e) => format!("fsync task: {e}"),
            };
            if res.is_ok() {
                res = Err(r);
            }
        }
        if let (Err(Err(why)), Some(orphans)) = (reply.send(res), orphans) {
            orphans.report(why);
        }
    });
    rx
}

/// fsyncs every descriptor through io_uring, all submitted at once (see
/// [`join_fsyncs`]).
pub fn fsync_all(
    fds: Vec<std::os::fd::OwnedFd>,
    orphans: Option<Orphans>,
) -> tokio::sync::oneshot::Receiver<FlushResult> {
    join_fsyncs(fds.into_iter().map(fsync_owned).collect(), orphans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fsync that fails after its requester stopped waiting (its
    /// session ended) is told to the hook at once and kept for the next
    /// flush to take, once.
    #[test]
    fn an_fsync_failing_with_nobody_waiting_reaches_the_orphans() {
        let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let t = told.clone();
        let orphans = Orphans {
            last: Default::default(),
            hook: Some(std::sync::Arc::new(move |why: &str| {
                t.lock().unwrap().push(why.to_string())
            })),
        };
        let o = orphans.clone();
        tokio_uring::start(async move {
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let failing = tokio_uring::spawn(async move {
                let _ = wait.await;
                Err(io::Error::from_raw_os_error(5))
            });
            let done = join_fsyncs(vec![failing], Some(o));
            drop(done);
            let _ = go.send(());
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        });
        let why = orphans.take().expect("the failure is kept");
        assert!(
            why.starts_with("fsync: ") && why.contains("os error 5"),
            "{why}"
        );
        assert_eq!(orphans.take(), None);
        assert_eq!(*told.lock().unwrap(), vec![why]);
    }

    /// The receiver's flushes and the ingester's commits share one thread,
    /// in the order asked; a job that panics leaves it serving.
    #[test]
    fn the_durable_worker_runs_flushes_and_jobs_in_order_and_outlives_a_panicking_job() {
        let dir = tempfile::tempdir().unwrap();
        let w = DurableWorker::start("test-durable").unwrap();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = order.clone();
        let first = w
            .run(move || {
                o.lock().unwrap().push("job");
                std::thread::current().name().map(str::to_owned)
            })
            .unwrap();
        let mut flushed = w.flush(vec![dir.path().to_path_buf()]);
        let o = order.clone();
        // The flush asked before this job has answered by the time it runs.
        let after = w
            .run(move || {
                o.lock().unwrap().push("after flush");
                flushed.try_recv()
            })
            .unwrap();
        assert_eq!(first.recv().unwrap().as_deref(), Some("test-durable"));
        assert_eq!(after.recv().unwrap(), Ok(Ok(())));
        assert_eq!(*order.lock().unwrap(), ["job", "after flush"]);

        let panicked = w
            .run(|| -> u32 { panic!("a job that fails its own way") })
            .unwrap();
        assert!(panicked.recv().is_err(), "a panicked job sends no outcome");
        assert_eq!(
            w.flush(vec![dir.path().to_path_buf()])
                .blocking_recv()
                .unwrap(),
            Ok(())
        );
        let missing = dir.path().join("gone");
        let err = w
            .flush(vec![missing.clone()])
            .blocking_recv()
            .unwrap()
            .unwrap_err();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
