//! The replica's group commit as a sans-IO state machine: which staged
//! files to flush, land and acknowledge, and when. No files, flushes,
//! clocks or sockets here; the receiver performs the outputs and feeds the
//! flush outcomes back (`replica::receiver`), and the simulator in
//! `commit_sim` drives this same code against a filesystem model with
//! crash semantics.
//!
//! A commit takes every staged file and every barrier seen so far:
//! 1. [`Output::FlushData`]: make the files' content durable;
//! 2. [`Output::Land`]: rename them into place (never before step 1);
//! 3. [`Output::FlushDirs`]: make the renames (the directory entries)
//!    durable; when the directory flush also flushes file data (syncfs),
//!    files staged meanwhile ride along as their data flush (they are
//!    *folded* into it);
//! 4. [`Output::Ack`]: only now is every op up to the commit's barriers
//!    durable.
//!
//! A failed flush ends the commit with [`Output::Failed`] (its files are
//! not durable: discard them and ask again) and the pipeline acknowledges
//! nothing more.

use std::collections::VecDeque;

/// What the driver must do next, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<F, B> {
    /// Flush the content of the files the commit took
    /// ([`Pipeline::flushing_mut`]).
    FlushData,
    /// Their content is durable: rename these into place.
    Land(Vec<F>),
    /// Flush the directories of everything landed so far (and, folded, the
    /// content of [`Pipeline::folded`]).
    FlushDirs,
    /// Every op up to these barriers is durable.
    Ack(Vec<B>),
    /// The flush in flight failed: these files are not durable. Nothing is
    /// acknowledged after this.
    Failed(Vec<F>),
}

/// What an op needs landed before it applies (see [`Pipeline::gate`]).
pub enum Before<T> {
    /// Nothing: it does not touch the tree (a barrier, a file's data).
    Nothing,
    /// The files of the commit in flight (an op on a path sees every file
    /// of a commit that started before it in place), and every staged file
    /// for which `T` says the op touches it (then every staged file lands
    /// first: folded into the directory flush in flight, or in a commit
    /// of their own).
    Touching(T),
    /// Every staged file, and every commit complete (a manifest describes
    /// the tree as it is).
    All,
}

/// Whether the op waiting at [`Pipeline::gate`] may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Now: everything it needed is landed.
    Open,
    /// After the flush in flight reports ([`Pipeline::flushed`], its
    /// outputs performed): then ask again.
    AwaitFlush,
    /// Never in this session: a flush failed and nothing lands any more.
    Failed,
}

/// Which flush is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Data,
    Dirs,
}

struct InFlight<F, B> {
    phase: Phase,
    /// Waiting for their data flush.
    files: Vec<F>,
    barriers: Vec<B>,
    /// Folded into the directory flush as their data flush.
    next: Vec<F>,
    next_barriers: Vec<B>,
}

/// The group commit of one session.
pub struct Pipeline<F, B> {
    /// Whether the directory flush also makes file content durable (syncfs
    /// flushes the whole filesystem; per-directory fsync does not).
    fold: bool,
    staged: Vec<F>,
    barriers: Vec<B>,
    inflight: Option<InFlight<F, B>>,
    failed: bool,
    out: VecDeque<Output<F, B>>,
}

impl<F, B> Pipeline<F, B> {
    /// The pipeline for `durability`: with syncfs (the whole filesystem
    /// flushed) the directory flush is also the data flush of files staged
    /// meanwhile; per-directory fsyncs are not.
    pub fn for_durability(durability: super::Durability) -> Self {
        Self::new(durability == super::Durability::Syncfs)
    }

    pub fn new(fold: bool) -> Self {
        Pipeline {
            fold,
            staged: Vec::new(),
            barriers: Vec::new(),
            inflight: None,
            failed: false,
            out: VecDeque::new(),
        }
    }

    /// A file's content and metadata are written: it waits for a commit.
    pub fn stage(&mut self, f: F) {
        self.staged.push(f);
    }

    /// The primary closed a batch: acknowledged once a commit that takes it
    /// is durable.
    pub fn barrier(&mut self, b: B) {
        self.barriers.push(b);
    }

    /// Starts a commit if none is in flight and a barrier waits (or, with
    /// `now`, anything is staged or waits): [`Output::FlushData`] follows.
    pub fn start(&mut self, now: bool) {
        let due = !self.barriers.is_empty() || (now && !self.staged.is_empty());
        if self.inflight.is_some() || self.failed || !due {
            return;
        }
        self.inflight = Some(InFlight {
            phase: Phase::Data,
            files: std::mem::take(&mut self.staged),
            barriers: std::mem::take(&mut self.barriers),
            next: Vec::new(),
            next_barriers: Vec::new(),
        });
        self.out.push_back(Output::FlushData);
    }

    /// The flush in flight finished (`ok`: durable).
    pub fn flushed(&mut self, ok: bool) {
        let Some(mut c) = self.inflight.take() else {
            return;
        };
        if !ok {
            self.failed = true;
            let lost: Vec<F> = c.files.into_iter().chain(c.next).collect();
            self.out.push_back(Output::Failed(lost));
            return;
        }
        match c.phase {
            Phase::Data => {
                self.out
                    .push_back(Output::Land(std::mem::take(&mut c.files)));
                self.fold_and_flush_dirs(c);
            }
            Phase::Dirs => {
                self.out
                    .push_back(Output::Ack(std::mem::take(&mut c.barriers)));
                if !c.next.is_empty() || !c.next_barriers.is_empty() {
                    // Their data is durable: land them, and go on as the
                    // next commit's directory flush.
                    self.out
                        .push_back(Output::Land(std::mem::take(&mut c.next)));
                    c.barriers = std::mem::take(&mut c.next_barriers);
                    self.fold_and_flush_dirs(c);
                }
            }
        }
    }

    fn fold_and_flush_dirs(&mut self, mut c: InFlight<F, B>) {
        c.phase = Phase::Dirs;
        if self.fold {
            c.next = std::mem::take(&mut self.staged);
            c.next_barriers = std::mem::take(&mut self.barriers);
        }
        self.inflight = Some(c);
        self.out.push_back(Output::FlushDirs);
    }

    /// Whether an op that needs `before` landed may apply now. When not,
    /// a flush is in flight (one may have been started: perform the outputs
    /// first); the driver reads nothing more, reports the flush and asks
    /// again. Asking again recomputes from the pipeline's state, so the
    /// driver keeps no state of its own between the calls.
    pub fn gate(&mut self, before: &Before<impl Fn(&F) -> bool>) -> Gate {
        if self.failed {
            return match before {
                Before::Nothing => Gate::Open,
                _ => Gate::Failed,
            };
        }
        match before {
            Before::Nothing => Gate::Open,
            Before::Touching(touches) => {
                if self.files_waiting() {
                    return Gate::AwaitFlush;
                }
                if !self.staged.iter().any(touches) {
                    return Gate::Open;
                }
                // Every staged file lands first: folded into the directory
                // flush in flight (with syncfs) as it completes, or in a
                // commit of their own once none is in flight. The op may
                // then apply while a directory flush that lands nothing
                // more is in flight, as an op touching no staged file does.
                if self.inflight.is_none() {
                    self.start(true);
                }
                Gate::AwaitFlush
            }
            Before::All => {
                if self.inflight.is_some() {
                    return Gate::AwaitFlush;
                }
                if !self.has_work() {
                    return Gate::Open;
                }
                self.start(true);
                Gate::AwaitFlush
            }
        }
    }

    pub fn poll_output(&mut self) -> Option<Output<F, B>> {
        self.out.pop_front()
    }

    /// The files of the data flush just asked for.
    pub fn flushing_mut(&mut self) -> &mut [F] {
        match &mut self.inflight {
            Some(c) if c.phase == Phase::Data => &mut c.files,
            _ => &mut [],
        }
    }

    /// Files riding along with the directory flush in flight.
    pub fn folded(&self) -> &[F] {
        match &self.inflight {
            Some(c) if c.phase == Phase::Dirs => &c.next,
            _ => &[],
        }
    }

    /// The flush in flight, if any.
    pub fn phase(&self) -> Option<Phase> {
        self.inflight.as_ref().map(|c| c.phase)
    }

    /// Barriers of the flush in flight (for its timing).
    pub fn flushing_barriers(&self) -> &[B] {
        self.inflight.as_ref().map_or(&[], |c| &c.barriers)
    }

    /// Whether files of the commit in flight still wait to be landed (an op
    /// on any path must see every earlier file in place first).
    pub fn files_waiting(&self) -> bool {
        self.inflight
            .as_ref()
            .is_some_and(|c| c.phase == Phase::Data || !c.next.is_empty())
    }

    pub fn staged(&self) -> &[F] {
        &self.staged
    }

    pub fn has_work(&self) -> bool {
        !self.staged.is_empty() || !self.barriers.is_empty()
    }

    /// Everything not landed (the session ends): staged, in flight, folded.
    pub fn take_unlanded(&mut self) -> Vec<F> {
        self.barriers.clear();
        let mut all = Vec::new();
        if let Some(c) = self.inflight.take() {
            all.extend(c.files);
            all.extend(c.next);
        }
        all.append(&mut self.staged);
        self.out.clear();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut Pipeline<u32, u64>) -> Vec<Output<u32, u64>> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    #[test]
    fn a_commit_flushes_data_lands_flushes_dirs_then_acks() {
        let mut p = Pipeline::new(false);
        p.stage(1);
        p.stage(2);
        p.barrier(10);
        p.start(false);
        assert_eq!(drain(&mut p), [Output::FlushData]);
        assert_eq!(p.flushing_mut(), [1, 2]);
        p.flushed(true);
        assert_eq!(drain(&mut p), [Output::Land(vec![1, 2]), Output::FlushDirs]);
        p.flushed(true);
        assert_eq!(drain(&mut p), [Output::Ack(vec![10])]);
        assert_eq!(p.phase(), None);
    }

    #[test]
    fn with_folding_files_staged_meanwhile_ride_the_directory_flush() {
        let mut p = Pipeline::new(true);
        p.stage(1);
        p.barrier(10);
        p.start(false);
        drain(&mut p);
        p.stage(2);
        p.barrier(11);
        p.flushed(true);
        assert_eq!(drain(&mut p), [Output::Land(vec![1]), Output::FlushDirs]);
        assert_eq!(p.folded(), [2]);
        p.flushed(true);
        assert_eq!(
            drain(&mut p),
            [
                Output::Ack(vec![10]),
                Output::Land(vec![2]),
                Output::FlushDirs
            ]
        );
        p.flushed(true);
        assert_eq!(drain(&mut p), [Output::Ack(vec![11])]);
    }

    fn gate_until_open(
        p: &mut Pipeline<u32, u64>,
        before: &Before<impl Fn(&u32) -> bool>,
    ) -> Vec<Output<u32, u64>> {
        let mut seen = Vec::new();
        loop {
            match p.gate(before) {
                Gate::Open => return seen,
                Gate::AwaitFlush => {
                    seen.extend(drain(p));
                    p.flushed(true);
                    seen.extend(drain(p));
                }
                Gate::Failed => panic!("no flush failed"),
            }
        }
    }

    #[test]
    fn an_op_waits_for_the_files_in_flight_and_for_the_staged_files_it_touches_only() {
        let mut p = Pipeline::new(true);
        p.stage(1);
        p.barrier(10);
        p.start(false);
        drain(&mut p);
        p.stage(2);
        p.stage(3);
        // Touching 3: file 1 (in flight) lands first, then 2 and 3 (staged,
        // folded into the directory flush or in a commit of their own).
        let seen = gate_until_open(&mut p, &Before::Touching(|f: &u32| *f == 3));
        let landed: Vec<u32> = seen
            .iter()
            .flat_map(|o| match o {
                Output::Land(f) => f.clone(),
                _ => vec![],
            })
            .collect();
        assert_eq!(landed, [1, 2, 3]);
        // Touching none of the staged: open at once, 4 stays staged.
        p.stage(4);
        let seen = gate_until_open(&mut p, &Before::Touching(|f: &u32| *f == 99));
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(p.staged(), [4]);
        // A manifest: everything lands and every commit completes.
        p.barrier(11);
        gate_until_open(&mut p, &Before::<fn(&u32) -> bool>::All);
        assert_eq!(p.phase(), None);
        assert!(!p.has_work());
    }

    #[test]
    fn after_a_failed_flush_the_gate_stays_shut_for_ops_on_paths() {
        let mut p = Pipeline::new(false);
        p.stage(1);
        p.barrier(10);
        p.start(false);
        drain(&mut p);
        assert_eq!(p.gate(&Before::Touching(|_: &u32| false)), Gate::AwaitFlush);
        p.flushed(false);
        assert_eq!(p.gate(&Before::Touching(|_: &u32| false)), Gate::Failed);
        assert_eq!(p.gate(&Before::<fn(&u32) -> bool>::All), Gate::Failed);
        assert_eq!(p.gate(&Before::<fn(&u32) -> bool>::Nothing), Gate::Open);
    }

    #[test]
    fn a_failed_flush_loses_its_files_and_acknowledges_nothing_more() {
        let mut p = Pipeline::new(true);
        p.stage(1);
        p.barrier(10);
        p.start(false);
        drain(&mut p);
        p.flushed(true);
        drain(&mut p);
        p.stage(2);
        p.barrier(11);
        p.flushed(false);
        assert_eq!(drain(&mut p), [Output::Failed(vec![])]);
        p.start(false);
        assert!(drain(&mut p).is_empty(), "nothing starts after a failure");
        assert_eq!(p.take_unlanded(), [2]);
    }
}
