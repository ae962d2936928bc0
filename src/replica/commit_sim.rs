//! A deterministic simulator of the replica's group commit: the real
//! [`Pipeline`] (the code the receiver runs) driven the way the receiver
//! drives it, against a filesystem model with crash semantics, on one seed.
//!
//! The model: a staged file's content is durable only once a flush that
//! *started after it was written* and covers it completes; a name landed
//! (renamed into place) is durable only once a directory flush that started
//! after the rename completes. With `syncfs` every flush covers everything
//! written and landed before it started; with per-file `fsync` the data
//! flush covers the commit's files only and the directory flush covers
//! names only. A flush may fail (EIO): it makes nothing durable. A crash
//! keeps exactly what is durable.
//!
//! Checked after every step:
//! - a name is landed only over durable content (a crash never shows a
//!   name with content that was not flushed);
//! - an acknowledgement of barrier `b` comes only once every file sent
//!   before `b` is landed and durable, content and name (a crash at that
//!   instant loses nothing acknowledged);
//! - barriers are acknowledged once each, in order, and none after a
//!   failed flush;
//! - at quiescence (no failure) every barrier is acknowledged and every
//!   file landed.

use super::commit::{Before, Gate, Output, Phase, Pipeline};
use crate::failover::sim::SimRng;

/// How the flushes behave: `[replication] durability`.
pub use super::Durability as Mode;

#[derive(Debug, Default, Clone, Copy)]
struct File {
    landed_at: Option<u64>,
    data_durable: bool,
    name_durable: bool,
    lost: bool,
}

/// A flush in flight: what it will make durable if it succeeds.
struct Flush {
    data: Vec<u32>,
    names: Vec<u32>,
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub files: u64,
    pub acks: u64,
    pub flushes: u64,
    pub failures: u64,
    pub folded: u64,
}

pub struct CommitSim {
    rng: SimRng,
    mode: Mode,
    /// Percent of flushes that fail.
    fail_percent: u8,
    steps: usize,
    pipeline: Pipeline<u32, u64>,
    files: Vec<File>,
    /// Barrier seq → files sent before it (ids below this).
    barriers: Vec<(u64, u32)>,
    next_seq: u64,
    acked: Vec<u64>,
    flush: Option<Flush>,
    failed: bool,
    clock: u64,
    log: Vec<String>,
    out: Outcome,
}

impl CommitSim {
    pub fn new(seed: u64) -> CommitSim {
        let mut rng = SimRng::new(seed);
        let mode = if rng.percent(50) {
            Mode::Syncfs
        } else {
            Mode::Fsync
        };
        // A quarter of the runs see failing flushes.
        let fail_percent = if rng.percent(25) {
            rng.range(1, 20) as u8
        } else {
            0
        };
        let steps = rng.range(20, 300) as usize;
        Self::with(rng, mode, fail_percent, steps)
    }

    /// A run in `mode`, with the pipeline the receiver builds for it.
    pub fn with(rng: SimRng, mode: Mode, fail_percent: u8, steps: usize) -> CommitSim {
        CommitSim {
            rng,
            mode,
            fail_percent,
            steps,
            pipeline: Pipeline::for_durability(mode),
            files: Vec::new(),
            barriers: Vec::new(),
            next_seq: 1,
            acked: Vec::new(),
            flush: None,
            failed: false,
            clock: 0,
            log: Vec::new(),
            out: Outcome::default(),
        }
    }

    fn note(&mut self, line: String) {
        self.log.push(format!("t{} {line}", self.clock));
    }

    fn violation(&self, what: String) -> String {
        let tail: Vec<&String> = self.log.iter().rev().take(40).collect();
        let mut s = format!("{what}\nmode {:?}, last steps:", self.mode);
        for l in tail.into_iter().rev() {
            s.push_str("\n  ");
            s.push_str(l);
        }
        s
    }

    /// Runs the seed's steps, then drains to quiescence.
    pub fn run(mut self) -> Result<Outcome, String> {
        for _ in 0..self.steps {
            if self.failed {
                break;
            }
            self.clock += 1;
            let roll = self.rng.range(0, 99);
            match roll {
                0..=39 => {
                    let id = self.files.len() as u32;
                    self.files.push(File::default());
                    self.note(format!("stage {id}"));
                    self.pipeline.stage(id);
                    self.out.files += 1;
                }
                40..=59 => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.barriers.push((seq, self.files.len() as u32));
                    self.note(format!("barrier {seq}"));
                    self.pipeline.barrier(seq);
                }
                60..=89 => {
                    if self.flush.is_some() {
                        self.complete_flush()?;
                    }
                }
                90..=99 => {
                    // An op on a path (touching the staged files with
                    // `id % 3 == touched`; 3: none of them), or a manifest
                    // (everything lands): the receiver's gate.
                    let manifest = roll >= 95;
                    let touched = self.rng.range(0, 3) as u32;
                    let before = if manifest {
                        self.note("manifest: everything lands".into());
                        Before::All
                    } else {
                        self.note(format!("op on a path touching id % 3 == {touched}"));
                        Before::Touching(move |id: &u32| id % 3 == touched)
                    };
                    self.pass(&before)?;
                    if !self.failed {
                        self.check_gate(manifest, touched)?;
                    }
                }
                _ => unreachable!("a roll is below 100"),
            }
            if !self.failed && self.pipeline.phase().is_none() {
                self.pipeline.start(false);
            }
            self.perform()?;
        }
        if self.failed {
            return Ok(self.out);
        }
        // Quiescence: no more input; flushes succeed.
        self.fail_percent = 0;
        for _ in 0..3 {
            self.finish()?;
            if self.pipeline.has_work() {
                self.pipeline.start(true);
                self.perform()?;
            }
        }
        self.finish()?;
        if let Some((seq, _)) = self.barriers.iter().find(|(s, _)| !self.acked.contains(s)) {
            return Err(self.violation(format!("barrier {seq} never acknowledged")));
        }
        if let Some(i) = self.files.iter().position(|f| f.landed_at.is_none()) {
            return Err(self.violation(format!("file {i} never landed")));
        }
        Ok(self.out)
    }

    /// Waits at the receiver's gate until the op may apply (or a flush
    /// failed).
    fn pass(&mut self, before: &Before<impl Fn(&u32) -> bool>) -> Result<(), String> {
        loop {
            match self.pipeline.gate(before) {
                Gate::Open | Gate::Failed => return Ok(()),
                Gate::AwaitFlush => {
                    self.perform()?;
                    self.complete_flush()?;
                }
            }
        }
    }

    /// After the gate opened: every file of a commit started before the op
    /// is in place, and every staged file the op touches (with a manifest:
    /// every file, and no commit in flight).
    fn check_gate(&self, manifest: bool, touched: u32) -> Result<(), String> {
        let staged = self.pipeline.staged();
        for (id, f) in self.files.iter().enumerate() {
            let id = id as u32;
            let must = manifest || id % 3 == touched || !staged.contains(&id);
            if must && !f.lost && f.landed_at.is_none() {
                return Err(self.violation(format!(
                    "the gate opened with file {id} not landed (manifest {manifest})"
                )));
            }
        }
        if manifest && self.pipeline.phase().is_some() {
            return Err(
                self.violation("the gate opened for a manifest with a commit in flight".into())
            );
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        while self.pipeline.phase().is_some() && !self.failed {
            self.complete_flush()?;
        }
        Ok(())
    }

    fn complete_flush(&mut self) -> Result<(), String> {
        let Some(f) = self.flush.take() else {
            return Err(self.violation("the pipeline waits for a flush nobody asked for".into()));
        };
        self.clock += 1;
        let ok = !self.rng.percent(self.fail_percent);
        self.out.flushes += 1;
        if ok {
            for id in f.data {
                self.files[id as usize].data_durable = true;
            }
            for id in f.names {
                self.files[id as usize].name_durable = true;
            }
            self.note(format!("flush {:?} ok", self.pipeline.phase()));
        } else {
            self.out.failures += 1;
            self.note(format!("flush {:?} FAILED", self.pipeline.phase()));
        }
        self.pipeline.flushed(ok);
        self.perform()
    }

    /// What a flush started now makes durable when it completes.
    fn snapshot(&self, phase: Phase, commit_files: &[u32]) -> Flush {
        let written: Vec<u32> = (0..self.files.len() as u32)
            .filter(|i| !self.files[*i as usize].lost)
            .collect();
        let landed: Vec<u32> = written
            .iter()
            .copied()
            .filter(|i| self.files[*i as usize].landed_at.is_some())
            .collect();
        match (self.mode, phase) {
            (Mode::Syncfs, _) => Flush {
                data: written,
                names: landed,
            },
            (Mode::Fsync, Phase::Data) => Flush {
                data: commit_files.to_vec(),
                names: Vec::new(),
            },
            (Mode::Fsync, Phase::Dirs) => Flush {
                data: Vec::new(),
                names: landed,
            },
        }
    }

    fn perform(&mut self) -> Result<(), String> {
        while let Some(out) = self.pipeline.poll_output() {
            match out {
                Output::FlushData => {
                    if self.flush.is_some() {
                        return Err(self.violation("two flushes in flight".into()));
                    }
                    let files = self.pipeline.flushing_mut().to_vec();
                    self.note(format!("flush data of {files:?}"));
                    self.flush = Some(self.snapshot(Phase::Data, &files));
                }
                Output::FlushDirs => {
                    if self.flush.is_some() {
                        return Err(self.violation("two flushes in flight".into()));
                    }
                    let folded = self.pipeline.folded().len() as u64;
                    self.out.folded += folded;
                    self.note(format!("flush dirs ({folded} folded)"));
                    self.flush = Some(self.snapshot(Phase::Dirs, &[]));
                }
                Output::Land(ids) => {
                    self.note(format!("land {ids:?}"));
                    for id in ids {
                        let f = &mut self.files[id as usize];
                        if !f.data_durable {
                            return Err(self.violation(format!(
                                "file {id} landed before its content was durable"
                            )));
                        }
                        if f.landed_at.is_some() {
                            return Err(self.violation(format!("file {id} landed twice")));
                        }
                        f.landed_at = Some(self.clock);
                    }
                }
                Output::Ack(seqs) => {
                    self.note(format!("ack {seqs:?}"));
                    for seq in seqs {
                        if self.failed {
                            return Err(self
                                .violation(format!("barrier {seq} acknowledged after a failure")));
                        }
                        if self.acked.last().is_some_and(|l| *l >= seq) {
                            return Err(self.violation(format!(
                                "barrier {seq} acknowledged out of order or twice"
                            )));
                        }
                        let upto = self
                            .barriers
                            .iter()
                            .find(|(s, _)| *s == seq)
                            .map(|(_, n)| *n)
                            .ok_or_else(|| self.violation(format!("unknown barrier {seq}")))?;
                        for id in 0..upto {
                            let f = self.files[id as usize];
                            if f.lost || !f.data_durable || !f.name_durable || f.landed_at.is_none()
                            {
                                return Err(self.violation(format!(
                                    "barrier {seq} acknowledged while file {id} would not survive a crash: {f:?}"
                                )));
                            }
                        }
                        self.acked.push(seq);
                        self.out.acks += 1;
                    }
                }
                Output::Failed(ids) => {
                    self.note(format!("failed, losing {ids:?}"));
                    self.failed = true;
                    self.flush = None;
                    for id in ids {
                        self.files[id as usize].lost = true;
                    }
                    // The session ends: everything not landed is dropped.
                    for id in self.pipeline.take_unlanded() {
                        self.files[id as usize].lost = true;
                    }
                }
            }
        }
        // Files landed but not yet under a durable name are fine until a
        // barrier after them is acknowledged (checked there).
        Ok(())
    }
}

/// Runs `n` seeds from `first`; the first violation names its seed.
pub fn run_seeds(first: u64, n: u64) -> Result<Outcome, (u64, String)> {
    let mut total = Outcome::default();
    for seed in first..first + n {
        let o = CommitSim::new(seed).run().map_err(|e| (seed, e))?;
        total.files += o.files;
        total.acks += o.acks;
        total.flushes += o.flushes;
        total.failures += o.failures;
        total.folded += o.folded;
    }
    Ok(total)
}
