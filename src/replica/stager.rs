//! The secondary's staging writer (syncfs durability): a thread that writes
//! staged files' content, applies their metadata and hands the group-commit
//! flushes on to the durable-commit thread, so that the receiver's event loop only
//! decodes, hashes, creates and renames.
//!
//! Copying content into the page cache is most of the secondary's CPU
//! during an initial sync (`pwrite`, measured at 55% of it); on its own
//! thread it runs on another core than the loop.
//!
//! Jobs run in order. A flush request is queued like any other job and is
//! passed to the durable-commit thread only once every write and metadata change
//! queued before it is done, so a flush always covers the files staged
//! before it was asked for. The outcome of each file (its `fstat`, or why it
//! failed) is sent back before any later flush can start, so the loop has
//! it by the time that flush reports.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::fsops::{apply_staged_meta, FsError};
use super::index;
use crate::io::{DurableWorker, FlushResult};
use crate::wire::sync::Meta;

/// Content bytes queued for writing at most (the loop waits beyond it).
const QUEUED_BYTES: usize = 16 << 20;

/// A staged file being written; shared by the loop and the writer.
pub struct StagedFile {
    fd: OwnedFd,
    /// The first write that failed; later writes are skipped.
    failed: Mutex<Option<FsError>>,
}

impl StagedFile {
    pub fn new(fd: OwnedFd) -> Arc<StagedFile> {
        Arc::new(StagedFile {
            fd,
            failed: Mutex::new(None),
        })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The descriptor, if nothing else holds the file.
    pub fn into_fd(self: Arc<StagedFile>) -> Option<OwnedFd> {
        Arc::try_unwrap(self).ok().map(|f| f.fd)
    }

    /// Writes `buf` at `offset` (here, or on the staging thread); after a
    /// failure, later writes are skipped and [`StagedFile::take_failure`]
    /// reports it.
    pub fn write(&self, buf: &[u8], offset: u64) {
        let mut failed = self.failed.lock().expect("staged file lock");
        if failed.is_some() {
            return;
        }
        if let Err(e) = crate::io::pwrite_all(self.fd.as_fd(), buf, offset) {
            *failed = Some(FsError::from_io("write", "<staged file>", e));
        }
    }

    /// The first write that failed, if any.
    pub fn take_failure(&self) -> Option<FsError> {
        self.failed.lock().expect("staged file lock").take()
    }
}

/// A file's outcome: its state as written, or why it cannot land.
pub struct Done {
    pub seq: u64,
    pub res: Result<Option<index::Stat>, FsError>,
}

enum Job {
    Write {
        file: Arc<StagedFile>,
        offset: u64,
        buf: Vec<u8>,
        range: Range<usize>,
        _budget: OwnedSemaphorePermit,
    },
    Finish {
        seq: u64,
        file: Arc<StagedFile>,
        meta: Meta,
        owners: bool,
    },
    Flush {
        roots: Vec<PathBuf>,
        reply: oneshot::Sender<FlushResult>,
    },
    Drained(oneshot::Sender<()>),
}

pub struct Stager {
    jobs: crate::io::handoff::Sender<Job>,
    done: crossbeam_channel::Receiver<Done>,
    budget: Arc<Semaphore>,
}

impl Stager {
    /// Starts the writer thread; flushes go on to `flusher`.
    pub fn start(flusher: DurableWorker) -> io::Result<Stager> {
        let (jobs, rx) = crate::io::handoff::channel::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("hasync-stage".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Write {
                            file,
                            offset,
                            buf,
                            range,
                            _budget,
                        } => file.write(&buf[range], offset),
                        Job::Finish {
                            seq,
                            file,
                            meta,
                            owners,
                        } => {
                            let res = match file.take_failure() {
                                Some(e) => Err(e),
                                // Metadata after the last write (a write moves the mtime).
                                None => apply_staged_meta(file.fd.as_fd(), &meta, owners)
                                    .map(|()| index::fstat(file.fd.as_fd()).ok().flatten()),
                            };
                            if done_tx.send(Done { seq, res }).is_err() {
                                return;
                            }
                        }
                        Job::Flush { roots, reply } => flusher.flush_with(roots, reply),
                        Job::Drained(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
            })?;
        Ok(Stager {
            jobs,
            done,
            budget: Arc::new(Semaphore::new(QUEUED_BYTES)),
        })
    }

    /// Queues `buf[range]` for `file` at `offset`; waits while too much
    /// content is queued already.
    pub async fn write(
        &self,
        file: &Arc<StagedFile>,
        offset: u64,
        buf: Vec<u8>,
        range: Range<usize>,
    ) {
        let cost = range.len().clamp(1, QUEUED_BYTES) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(cost).await else {
            return;
        };
        self.send(Job::Write {
            file: file.clone(),
            offset,
            buf,
            range,
            _budget: permit,
        });
    }

    /// Queues the metadata of a complete file; its [`Done`] follows.
    pub fn finish(&self, seq: u64, file: Arc<StagedFile>, meta: Meta, owners: bool) {
        self.send(Job::Finish {
            seq,
            file,
            meta,
            owners,
        });
    }

    /// A flush of `roots` that starts once everything queued so far is
    /// written.
    pub fn flush(&self, roots: Vec<PathBuf>) -> oneshot::Receiver<FlushResult> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Flush { roots, reply });
        rx
    }

    /// Waits until every job queued so far is done.
    pub async fn drained(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Drained(reply));
        let _ = rx.await;
    }

    /// Outcomes that arrived since the last call.
    pub fn take_done(&self) -> impl Iterator<Item = Done> + '_ {
        self.done.try_iter()
    }

    fn send(&self, job: Job) {
        // The thread only ends when this handle is dropped; a job sent to a
        // dead thread is reported by its missing outcome or flush reply.
        let _ = self.jobs.send(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime_sec: 1_600_000_000,
            mtime_nsec: 5,
        }
    }

    #[test]
    fn outcomes_are_in_before_a_later_flush_reports_and_content_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let stager = Stager::start(DurableWorker::start("test-flush").unwrap()).unwrap();
        let path = dir.path().join("staged");
        let fd: OwnedFd = std::fs::File::create(&path).unwrap().into();
        let file = StagedFile::new(fd);
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let flushed = tokio_uring::start(async {
            // Two frames' worth, each handed over with its whole buffer.
            let mut framed = b"HEADER".to_vec();
            framed.extend_from_slice(&body[..100_000]);
            stager.write(&file, 0, framed, 6..100_006).await;
            stager
                .write(&file, 100_000, body[100_000..].to_vec(), 0..200_000)
                .await;
            stager.finish(7, file, meta(), false);
            stager.flush(vec![dir.path().to_path_buf()]).await
        });
        assert_eq!(flushed.expect("flush answered"), Ok(()));
        let done: Vec<Done> = stager.take_done().collect();
        assert_eq!(done.len(), 1, "the outcome is in when the flush reports");
        assert_eq!(done[0].seq, 7);
        let st = done[0].res.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(st.version.size, body.len() as u64);
        assert!(std::fs::read(&path).unwrap() == body);
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.mtime(), m.mtime_nsec()),
            (0o640, 1_600_000_000, 5)
        );
    }

    #[test]
    fn a_failed_write_is_the_files_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let stager = Stager::start(DurableWorker::start("test-flush").unwrap()).unwrap();
        // A read-only descriptor: every write fails.
        std::fs::write(dir.path().join("ro"), b"").unwrap();
        let fd: OwnedFd = std::fs::File::open(dir.path().join("ro")).unwrap().into();
        let file = StagedFile::new(fd);
        tokio_uring::start(async {
            stager.write(&file, 0, b"data".to_vec(), 0..4).await;
            stager.finish(3, file, meta(), false);
            stager.drained().await;
        });
        let done: Vec<Done> = stager.take_done().collect();
        assert_eq!(done.len(), 1);
        let err = done[0].res.as_ref().expect_err("the write failed");
        assert!(err.to_string().contains("write"), "{err}");
    }
}
