//! A deterministic simulator of the queue push after a failover, on one
//! seed: the real [`PushSession`] and [`IngestSession`], the real commit
//! sequence ([`commit::commit`], [`commit::roll_forward`],
//! [`commit::recover`]) and the real [`Ledger`], driven the way `push`
//! drives them, against:
//! - the former primary's queue: a message's removal is durable only once
//!   its folder is flushed (at the end of a push); a crash keeps a prefix
//!   of the removals since;
//! - the new primary's queue filesystem: staged files, renames and
//!   removals are durable only once flushed; a crash keeps a prefix of
//!   what was done since the last flush (a journal commits in order);
//!   any operation may fail (EIO), a flush included, and a failed flush
//!   drops the content not yet written (as Linux does, reporting the
//!   error once: a batch staged meanwhile may be the one that lost it);
//! - the ledger's file: appends are durable only once flushed, but a crash
//!   may keep any prefix of what was appended since, torn records included
//!   (written pages reach the disk on their own); a flush or a cut may fail;
//! - an MTA on the new primary that delivers (and removes) durable
//!   messages;
//! - a link that delivers in order and cuts (both sessions end; a commit
//!   already started still runs and is heard at the next push);
//! - crashes of either node between any two steps, and of the new primary
//!   inside any step of a commit.
//!
//! - windows and batches of the real size or small ones, so that a push
//!   spans several (two windows outstanding, staging while a batch
//!   commits).
//!
//! Checked when a push ends: nothing the former primary keeps is counted
//! by the new primary's ledger (both would deliver it).
//! Checked at quiescence (faults stopped, a last push run to its end):
//! every message is exactly once in the former primary's queue, the new
//! primary's queue, or delivered; and the former primary's queue is empty.
//! Checked after every step: a message the former primary removed is held
//! by the new primary (durable in its queue, recorded in its ledger with
//! its staged parts durable, or delivered).
//!
//! Not modelled: the drivers' own code around the sessions (`push`,
//! `serve`: the commit thread, the id-keyed table of staged messages; the
//! simulator mirrors their sequencing), message content and integrity
//! checks (the wire codec and `Ingester::check` have their own tests), the
//! size and space checks, the promotion of a queue replica
//! (`ingest_local`), ledger compaction, queue IDs taken on the new primary,
//! side files, the hook, the epoch fence; roles never switch back during a
//! run (the end-of-push check stands in for the double delivery that
//! would follow).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

use super::commit::{self, Intent, QueueDisk, Settled};
use super::ledger::{Ledger, LedgerError, LedgerStore};
use super::session::{Admit, IngestSession, IngestStep, PushPhase, PushSession, PushStep};
use crate::failover::sim::SimRng;
use crate::wire::sync::QueueOutcome;

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub messages: u64,
    pub pushes: u64,
    pub commits: u64,
    pub pusher_crashes: u64,
    pub ingester_crashes: u64,
    pub cuts: u64,
    pub io_errors: u64,
    pub rolled_forward: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub delivered: u64,
}

impl Outcome {
    fn add(&mut self, o: &Outcome) {
        self.messages += o.messages;
        self.pushes += o.pushes;
        self.commits += o.commits;
        self.pusher_crashes += o.pusher_crashes;
        self.ingester_crashes += o.ingester_crashes;
        self.cuts += o.cuts;
        self.io_errors += o.io_errors;
        self.rolled_forward += o.rolled_forward;
        self.duplicates += o.duplicates;
        self.refused += o.refused;
        self.delivered += o.delivered;
    }
}

/// Faults the new primary's disk draws (shared by its queue filesystem
/// and its ledger file).
struct Faults {
    rng: SimRng,
    /// Percent of operations that fail with EIO.
    eio: u8,
    /// Percent of operations before which the node crashes.
    crash: u8,
    /// Set once a crash was drawn: every later operation fails until the
    /// simulator has crashed the node.
    crashed: bool,
    io_errors: u64,
}

impl Faults {
    /// Draws the fate of one operation.
    fn op(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("crashed"));
        }
        if self.rng.percent(self.crash) {
            self.crashed = true;
            return Err(io::Error::other("crashed"));
        }
        if self.rng.percent(self.eio) {
            self.io_errors += 1;
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

/// One operation on the new primary's queue filesystem since its last
/// flush (undone, in reverse, by a crash that does not keep it).
#[derive(Debug, Clone)]
enum Op {
    Create(PathBuf),
    Rename(PathBuf, PathBuf),
    Remove(PathBuf, SimFile),
}

/// A file on the new primary's queue filesystem.
#[derive(Debug, Clone, Copy)]
struct SimFile {
    key: u128,
    /// Its content reached the disk (a flush since it was written).
    flushed: bool,
    /// Its content is gone: a flush failed while it was unwritten (Linux
    /// drops such pages and reports the error once, to whichever flush
    /// comes next).
    lost: bool,
}

/// The new primary's queue filesystem: names → files.
struct SimDisk {
    faults: Rc<RefCell<Faults>>,
    files: RefCell<BTreeMap<PathBuf, SimFile>>,
    flush_failures: std::cell::Cell<u64>,
    /// Since the last flush, in order.
    ops: RefCell<Vec<Op>>,
    staging: PathBuf,
}

impl SimDisk {
    fn fault(&self) -> io::Result<()> {
        self.faults.borrow_mut().op()
    }

    /// Whether `path`'s entry is durable (no operation on it since the
    /// last flush).
    fn durable(&self, path: &Path) -> bool {
        self.files.borrow().contains_key(path)
            && !self.ops.borrow().iter().any(|op| match op {
                Op::Create(p) | Op::Remove(p, _) => p == path,
                Op::Rename(a, b) => a == path || b == path,
            })
    }

    fn create(&self, path: PathBuf, key: u128) -> io::Result<()> {
        self.fault()?;
        let f = SimFile {
            key,
            flushed: false,
            lost: false,
        };
        self.files.borrow_mut().insert(path.clone(), f);
        self.ops.borrow_mut().push(Op::Create(path));
        Ok(())
    }

    /// A crash: a prefix of the operations since the last flush survives.
    fn crash(&self, rng: &mut SimRng) {
        let mut ops = self.ops.borrow_mut();
        let keep = rng.range(0, ops.len() as u64) as usize;
        let mut files = self.files.borrow_mut();
        for op in ops.drain(keep..).rev() {
            match op {
                Op::Create(p) => {
                    files.remove(&p);
                }
                Op::Rename(a, b) => {
                    if let Some(k) = files.remove(&b) {
                        files.insert(a, k);
                    }
                }
                Op::Remove(p, f) => {
                    files.insert(p, f);
                }
            }
        }
        ops.clear();
    }

    /// The messages in the live queue whose content is there.
    fn queue_keys(&self) -> Vec<u128> {
        self.files
            .borrow()
            .iter()
            .filter(|(p, f)| !p.starts_with(&self.staging) && !f.lost)
            .map(|(_, f)| f.key)
            .collect()
    }
}

impl QueueDisk for SimDisk {
    fn flush_all(&self) -> io::Result<()> {
        let res = self.fault();
        let mut files = self.files.borrow_mut();
        match res {
            Ok(()) => {
                for f in files.values_mut() {
                    f.flushed = true;
                }
                self.ops.borrow_mut().clear();
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(5) => {
                // A writeback error: the unwritten content is gone.
                for f in files.values_mut().filter(|f| !f.flushed) {
                    f.lost = true;
                    f.flushed = true;
                }
                self.flush_failures.set(self.flush_failures.get() + 1);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn flush_failures(&self) -> u64 {
        self.flush_failures.get()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.fault()?;
        let mut files = self.files.borrow_mut();
        let k = files
            .remove(from)
            .ok_or_else(|| io::Error::from_raw_os_error(2))?;
        files.insert(to.to_owned(), k);
        self.ops
            .borrow_mut()
            .push(Op::Rename(from.to_owned(), to.to_owned()));
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.files.borrow().contains_key(path)
    }

    fn make_dirs(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn flush_dir(&self, dir: &Path) -> io::Result<()> {
        self.fault()?;
        // A journal commits in order: everything up to the last operation
        // in `dir` is durable with it.
        let mut ops = self.ops.borrow_mut();
        let touches = |p: &Path| p.parent() == Some(dir);
        if let Some(last) = ops.iter().rposition(|op| match op {
            Op::Create(p) | Op::Remove(p, _) => touches(p),
            Op::Rename(a, b) => touches(a) || touches(b),
        }) {
            ops.drain(..=last);
        }
        Ok(())
    }

    fn clear_staging(&self) {
        // Removals of garbage: durable or not, they change no outcome.
        let staging = self.staging.clone();
        self.files
            .borrow_mut()
            .retain(|p, _| !p.starts_with(&staging));
        self.ops.borrow_mut().retain(|op| match op {
            Op::Create(p) | Op::Remove(p, _) => !p.starts_with(&staging),
            Op::Rename(_, b) => !b.starts_with(&staging),
        });
    }

    fn remove_staged(&self, path: &Path) {
        // Not durable until a flush: a crash may bring it back.
        if let Some(f) = self.files.borrow_mut().remove(path) {
            self.ops.borrow_mut().push(Op::Remove(path.to_owned(), f));
        }
    }
}

/// The ledger's file.
struct SimStore {
    faults: Rc<RefCell<Faults>>,
    bytes: Rc<RefCell<(Vec<u8>, Vec<u8>)>>,
}

impl SimStore {
    /// (what a read sees, what is durable)
    fn fault(&self) -> io::Result<()> {
        self.faults.borrow_mut().op()
    }
}

impl LedgerStore for SimStore {
    fn read(&mut self) -> io::Result<Option<Vec<u8>>> {
        let b = self.bytes.borrow();
        Ok((!b.0.is_empty()).then(|| b.0.clone()))
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.bytes.borrow().0.len() as u64)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.fault()?;
        self.bytes.borrow_mut().0.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.fault()?;
        let mut b = self.bytes.borrow_mut();
        b.1 = b.0.clone();
        Ok(())
    }

    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.fault()?;
        let mut b = self.bytes.borrow_mut();
        b.0.truncate(len as usize);
        b.1 = b.0.clone();
        Ok(())
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.fault()?;
        let mut b = self.bytes.borrow_mut();
        b.0 = bytes.to_vec();
        b.1 = bytes.to_vec();
        Ok(())
    }
}

/// A frame on the link.
#[derive(Debug, Clone)]
enum ToIngester {
    Start,
    Msg { id: u64, key: u128 },
    Barrier,
    End,
}

#[derive(Debug, Clone)]
enum ToPusher {
    Ack { id: u64, outcome: QueueOutcome },
    EndAck,
}

/// The new primary's process state (gone at a crash).
struct Ingesting {
    session: IngestSession,
    /// Push id → staged intent, and the failed flushes counted before it
    /// was staged.
    staged: BTreeMap<u64, (Intent, u64)>,
    /// Identities in the queue when the push began.
    held: HashSet<u128>,
}

struct Commit {
    batch: Vec<Intent>,
    /// Failed flushes counted before its first message was staged.
    since: u64,
    /// The push it belongs to, if that is still on.
    push: u64,
}

pub struct QueueSim {
    rng: SimRng,
    seed: u64,
    /// The sessions' window and batch sizes in this run.
    window: usize,
    batch: usize,
    steps: usize,
    /// Messages: index → identity.
    keys: Vec<u128>,
    // The former primary.
    a_present: BTreeSet<usize>,
    /// Removed since its folder was last flushed, in order.
    a_removed: Vec<usize>,
    pusher: Option<PushSession<usize>>,
    // The new primary.
    faults: Rc<RefCell<Faults>>,
    disk: SimDisk,
    ledger_bytes: Rc<RefCell<(Vec<u8>, Vec<u8>)>>,
    ledger: Mutex<Ledger<SimStore>>,
    ingest: Option<Ingesting>,
    commits: VecDeque<Commit>,
    delivered: BTreeMap<u128, u32>,
    staged_counter: u64,
    // The link.
    push_no: u64,
    /// Pushes from this number on run without faults (0: none yet).
    clean_from: u64,
    clean_ended: bool,
    to_b: VecDeque<ToIngester>,
    to_a: VecDeque<ToPusher>,
    log: Vec<String>,
    out: Outcome,
}

const LEDGER_PATH: &str = "/b/state/queue-ledger.log";

fn open_ledger(
    faults: &Rc<RefCell<Faults>>,
    bytes: &Rc<RefCell<(Vec<u8>, Vec<u8>)>>,
) -> Ledger<SimStore> {
    let store = SimStore {
        faults: faults.clone(),
        bytes: bytes.clone(),
    };
    Ledger::with_store(
        store,
        Path::new(LEDGER_PATH),
        100_000,
        Duration::from_secs(86_400),
    )
    .expect("an empty ledger opens")
}

impl QueueSim {
    pub fn new(seed: u64) -> QueueSim {
        let mut rng = SimRng::new(seed);
        let n = rng.range(1, 60) as usize;
        // Small windows and batches, so that pushes span several of them
        // (two windows outstanding, staging while a batch commits).
        let window: usize = [2, 3, 5, 8, 256][rng.range(0, 4) as usize];
        // An ingester holds at most 4 batches unacknowledged; a pusher
        // keeps two windows in flight.
        let batch = [2, 4, 7, 256][rng.range(0, 3) as usize].max(window.div_ceil(2));
        let keys: Vec<u128> = (0..n)
            .map(|i| (u128::from(rng.next_u64()) << 64) | i as u128)
            .collect();
        let faults = Rc::new(RefCell::new(Faults {
            rng: SimRng::new(seed ^ 0x5151_5151),
            eio: [0, 2, 5, 10][rng.range(0, 3) as usize],
            crash: [0, 1, 3][rng.range(0, 2) as usize],
            crashed: false,
            io_errors: 0,
        }));
        let ledger_bytes = Rc::new(RefCell::new((Vec::new(), Vec::new())));
        let ledger = open_ledger(&faults, &ledger_bytes);
        QueueSim {
            window,
            batch,
            steps: rng.range(20, 400) as usize,
            rng,
            seed,
            a_present: (0..n).collect(),
            a_removed: Vec::new(),
            pusher: None,
            disk: SimDisk {
                faults: faults.clone(),
                files: RefCell::new(BTreeMap::new()),
                flush_failures: std::cell::Cell::new(0),
                ops: RefCell::new(Vec::new()),
                staging: PathBuf::from("/b/staging"),
            },
            faults,
            ledger_bytes,
            ledger: Mutex::new(ledger),
            ingest: None,
            commits: VecDeque::new(),
            delivered: BTreeMap::new(),
            staged_counter: 0,
            push_no: 0,
            clean_from: u64::MAX,
            clean_ended: false,
            to_b: VecDeque::new(),
            to_a: VecDeque::new(),
            log: Vec::new(),
            out: Outcome {
                messages: n as u64,
                ..Outcome::default()
            },
            keys,
        }
    }

    fn note(&mut self, s: String) {
        if self.log.len() < 4000 {
            self.log.push(s);
        }
    }

    fn fail(&self, why: String) -> String {
        let tail: Vec<&String> = self.log.iter().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        format!(
            "queue sim seed {}: {why}\nlast steps:\n{}",
            self.seed,
            tail.join("\n")
        )
    }

    pub fn run(mut self) -> Result<Outcome, String> {
        for _ in 0..self.steps {
            self.step(true)?;
            self.check_removed()?;
        }
        // Quiescence: faults stop; pushes run until one ends.
        {
            let mut f = self.faults.borrow_mut();
            f.eio = 0;
            f.crash = 0;
        }
        // A push that starts from here on runs without faults to its end.
        self.clean_from = self.push_no + 1;
        let mut guard = 0;
        while !(self.clean_ended && self.commits.is_empty()) {
            guard += 1;
            if guard > 200_000 {
                return Err(self.fail("no quiescence".into()));
            }
            self.step(false)?;
            self.check_removed()?;
        }
        self.check_exactly_once()?;
        self.out.io_errors = self.faults.borrow().io_errors;
        Ok(self.out)
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        if faults {
            let r = self.rng.range(0, 199);
            if r < 2 {
                return self.crash_pusher();
            }
            if r < 4 {
                return self.crash_ingester("between steps");
            }
            if r < 6 {
                self.cut("link cut");
                return Ok(());
            }
        }
        match self.rng.range(0, 9) {
            0..=2 => self.pusher_step(),
            3..=5 => self.ingester_step(),
            6..=7 => self.commit_step(),
            8 => {
                self.mta_step();
                Ok(())
            }
            _ => {
                if self.pusher.is_none() && self.to_b.is_empty() && self.to_a.is_empty() {
                    self.start_push();
                }
                Ok(())
            }
        }
    }

    fn start_push(&mut self) {
        self.push_no += 1;
        self.out.pushes += 1;
        let msgs: Vec<usize> = self.a_present.iter().copied().collect();
        self.note(format!("push {} of {} messages", self.push_no, msgs.len()));
        self.pusher = Some(PushSession::with_window(msgs, self.window));
        self.to_b.push_back(ToIngester::Start);
    }

    fn pusher_step(&mut self) -> Result<(), String> {
        let Some(p) = self.pusher.as_mut() else {
            return Ok(());
        };
        match p.poll() {
            Some(PushStep::Send(id)) => {
                let m = *p.message(id).expect("in flight");
                p.sent(id);
                let key = self.keys[m];
                self.to_b.push_back(ToIngester::Msg { id, key });
            }
            Some(PushStep::Barrier(_)) => self.to_b.push_back(ToIngester::Barrier),
            Some(PushStep::Delete(m)) => {
                self.a_present.remove(&m);
                self.a_removed.push(m);
                self.note(format!("A removes message {m}"));
            }
            Some(PushStep::End) => {
                // The folder flush after the removals.
                self.a_removed.clear();
                self.to_b.push_back(ToIngester::End);
            }
            None if p.phase() == PushPhase::Ended => {
                self.note("push ended".into());
                self.pusher = None;
                self.clean_ended |= self.push_no >= self.clean_from;
                // What the former primary keeps after a push that ended is
                // not counted by the new primary: kept on both, both would
                // deliver it.
                let ledger = self.ledger.lock().expect("ledger lock");
                if let Some(i) = self
                    .a_present
                    .iter()
                    .find(|&&i| ledger.contains(self.keys[i]))
                {
                    let i = *i;
                    drop(ledger);
                    return Err(self.fail(format!(
                        "a push ended with message {i} kept by the former primary while the new primary's ledger counts it"
                    )));
                }
            }
            None => {
                let Some(f) = self.to_a.pop_front() else {
                    return Ok(());
                };
                let res = match f {
                    ToPusher::Ack { id, outcome } => p.on_ack(id, outcome).map(|_| ()),
                    ToPusher::EndAck => p.on_end_ack(),
                };
                if let Err(v) = res {
                    return Err(self.fail(format!("the pusher saw a violation: {v}")));
                }
            }
        }
        Ok(())
    }

    fn ingester_step(&mut self) -> Result<(), String> {
        // Outputs first.
        if let Some(ing) = self.ingest.as_mut() {
            if let Some(step) = ing.session.poll() {
                match step {
                    IngestStep::Ack { id, outcome, .. } => {
                        ing.staged.remove(&id);
                        match outcome {
                            QueueOutcome::Duplicate => self.out.duplicates += 1,
                            QueueOutcome::Refused => self.out.refused += 1,
                            QueueOutcome::Ingested => {}
                        }
                        self.to_a.push_back(ToPusher::Ack { id, outcome });
                    }
                    IngestStep::Commit(ids) => {
                        let staged: Vec<(Intent, u64)> = ids
                            .iter()
                            .filter_map(|id| ing.staged.get(id).cloned())
                            .collect();
                        self.commits.push_back(Commit {
                            since: staged.iter().map(|(_, g)| *g).min().unwrap_or(0),
                            batch: staged.into_iter().map(|(i, _)| i).collect(),
                            push: self.push_no,
                        });
                    }
                    IngestStep::Finish { .. } => {
                        self.to_a.push_back(ToPusher::EndAck);
                        self.ingest = None;
                    }
                }
                return Ok(());
            }
        }
        let Some(f) = self.to_b.pop_front() else {
            return Ok(());
        };
        if matches!(f, ToIngester::Start) {
            return self.begin_ingest();
        }
        let Some(ing) = self.ingest.as_mut() else {
            return Err(self.fail(format!("{f:?} without a push")));
        };
        let res = match f {
            ToIngester::Start => unreachable!(),
            ToIngester::Msg { id, key } => {
                let held = ing.held.contains(&key)
                    || self.ledger.lock().expect("ledger lock").contains(key);
                match ing.session.on_message(id, key, held) {
                    Ok(Admit::Stage) => {
                        self.staged_counter += 1;
                        let staged = self.disk.staging.join(self.staged_counter.to_string());
                        let fin = PathBuf::from(format!("/b/queue/{key:032x}"));
                        let since = self.disk.flush_failures.get();
                        match self.disk.create(staged.clone(), key) {
                            Ok(()) => {
                                let intent = (key, format!("{key:x}"), vec![(staged, fin)]);
                                ing.staged.insert(id, (intent, since));
                                ing.session.staged(id, key)
                            }
                            Err(e) => ing.session.refused(id, e.to_string()),
                        }
                    }
                    Ok(Admit::Duplicate) => Ok(()),
                    Err(v) => Err(v),
                }
            }
            ToIngester::Barrier => ing.session.on_barrier(),
            ToIngester::End => ing.session.on_end(),
        };
        if self.faults.borrow().crashed {
            return self.crash_ingester("staging a message");
        }
        res.map_err(|v| self.fail(format!("the ingester saw a violation: {v}")))
    }

    /// A push begins on the new primary: a commit a cut push left is heard
    /// first, then what the ledger counts and is not landed is completed,
    /// and the queue is read.
    fn begin_ingest(&mut self) -> Result<(), String> {
        while !self.commits.is_empty() {
            self.commit_step_inner();
            if self.faults.borrow().crashed {
                return self.crash_ingester("finishing an earlier push's commit");
            }
        }
        // What the ledger counts lands before anything is judged a
        // duplicate; if it cannot, the push fails (nothing is ingested).
        let landed = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            commit::roll_forward(&self.disk, &mut ledger, None)
        };
        match landed {
            Ok(done) => self.out.rolled_forward += done.len() as u64,
            Err(_) if self.faults.borrow().crashed => {
                return self.crash_ingester("landing what the ledger counts")
            }
            Err(f) => {
                self.cut(&format!(
                    "the push fails: cannot land what the ledger counts ({})",
                    f.source
                ));
                return Ok(());
            }
        }
        let held = self.disk.queue_keys().into_iter().collect();
        let mut session = IngestSession::with_batch(self.batch);
        session.started();
        self.ingest = Some(Ingesting {
            session,
            staged: BTreeMap::new(),
            held,
        });
        Ok(())
    }

    fn commit_step(&mut self) -> Result<(), String> {
        if self.commits.is_empty() {
            return Ok(());
        }
        self.commit_step_inner();
        if self.faults.borrow().crashed {
            return self.crash_ingester("inside a commit");
        }
        Ok(())
    }

    /// Runs the oldest commit to its end, as the commit thread and then the
    /// loop (`on_committed`) do.
    fn commit_step_inner(&mut self) {
        let Some(c) = self.commits.pop_front() else {
            return;
        };
        self.out.commits += 1;
        let mut result = commit::commit(
            &self.disk,
            Path::new("/b/queue"),
            &self.ledger,
            &c.batch,
            c.since,
        )
        .map_err(|f| format!("{} {}: {}", f.op, f.path.display(), f.source));
        if self.faults.borrow().crashed {
            return;
        }
        if let Err(e) = &result {
            self.note(format!("commit of {} failed: {e}", c.batch.len()));
            let settled = {
                let mut ledger = self.ledger.lock().expect("ledger lock");
                commit::settle_failed(&self.disk, &mut ledger, &c.batch)
            };
            match settled {
                Settled::Landed(done) => {
                    self.out.rolled_forward += done.len() as u64;
                    result = Ok(());
                }
                Settled::NotCounted => {}
                Settled::Stuck(f) => {
                    // The push ends without acknowledging the batch.
                    self.note(format!("roll forward failed: {}", f.source));
                    if c.push == self.push_no && self.ingest.is_some() {
                        self.cut("the push ends: a counted batch could not be landed");
                    }
                    return;
                }
            }
        } else {
            self.note(format!("commit of {} landed", c.batch.len()));
        }
        if self.faults.borrow().crashed {
            return;
        }
        match self.ingest.as_mut() {
            Some(ing) if c.push == self.push_no => ing.session.committed(result),
            _ => {}
        }
    }

    fn mta_step(&mut self) {
        // The MTA delivers a durable message and removes it.
        let durable: Vec<(PathBuf, u128)> = self
            .disk
            .files
            .borrow()
            .iter()
            .filter(|(p, f)| p.starts_with("/b/queue") && !f.lost)
            .map(|(p, f)| (p.clone(), f.key))
            .filter(|(p, _)| self.disk.durable(p))
            .collect();
        if durable.is_empty() {
            return;
        }
        let (p, k) = durable[self.rng.range(0, durable.len() as u64 - 1) as usize].clone();
        self.disk.files.borrow_mut().remove(&p);
        *self.delivered.entry(k).or_insert(0) += 1;
        self.out.delivered += 1;
        self.note(format!("MTA delivers {k:x}"));
    }

    fn cut(&mut self, why: &str) {
        self.out.cuts += 1;
        self.note(format!("cut: {why}"));
        self.pusher = None;
        self.ingest = None;
        self.to_a.clear();
        self.to_b.clear();
    }

    fn crash_pusher(&mut self) -> Result<(), String> {
        self.out.pusher_crashes += 1;
        let keep = self.rng.range(0, self.a_removed.len() as u64) as usize;
        let lost: Vec<usize> = self.a_removed.drain(keep..).collect();
        self.note(format!("A crashes; removals undone: {lost:?}"));
        self.a_present.extend(lost);
        self.a_removed.clear();
        self.cut("the former primary crashed");
        Ok(())
    }

    fn crash_ingester(&mut self, when: &str) -> Result<(), String> {
        self.out.ingester_crashes += 1;
        self.note(format!("B crashes ({when})"));
        self.cut("the new primary crashed");
        self.commits.clear();
        self.faults.borrow_mut().crashed = false;
        self.disk.crash(&mut self.rng);
        self.crash_ledger_file();
        // The restart: the ledger read again, interrupted ingests completed.
        // A fault at the restart fails it (or crashes it again); the daemon
        // is started again until it comes up.
        for attempt in 0.. {
            if attempt == 50 {
                let mut f = self.faults.borrow_mut();
                f.eio = 0;
                f.crash = 0;
            }
            let store = SimStore {
                faults: self.faults.clone(),
                bytes: self.ledger_bytes.clone(),
            };
            let ledger = match Ledger::with_store(
                store,
                Path::new(LEDGER_PATH),
                100_000,
                Duration::from_secs(86_400),
            ) {
                Ok(l) => l,
                Err(LedgerError::Io { source, .. }) => {
                    self.note(format!(
                        "B's ledger open failed ({source}); it starts again"
                    ));
                    self.after_failed_start();
                    continue;
                }
                Err(e) => {
                    return Err(self.fail(format!("the ledger is unreadable after a crash: {e}")))
                }
            };
            *self.ledger.lock().expect("ledger lock") = ledger;
            let mut ledger = self.ledger.lock().expect("ledger lock");
            match commit::recover(&self.disk, &mut ledger) {
                Ok(done) => {
                    self.out.rolled_forward += done.len() as u64;
                    return Ok(());
                }
                Err(f) => {
                    drop(ledger);
                    self.note(format!(
                        "B's recovery failed ({}); it starts again",
                        f.source
                    ));
                    self.after_failed_start();
                }
            }
        }
        unreachable!("the restart loop returns")
    }

    /// A start that failed: a crash drawn inside it applies its crash
    /// semantics first.
    fn after_failed_start(&mut self) {
        if std::mem::take(&mut self.faults.borrow_mut().crashed) {
            self.disk.crash(&mut self.rng);
            self.crash_ledger_file();
        }
    }

    /// The ledger file after a crash: what was flushed, and any prefix of
    /// what was appended since (torn records included).
    fn crash_ledger_file(&mut self) {
        let mut b = self.ledger_bytes.borrow_mut();
        let (seen, durable) = (b.0.clone(), b.1.clone());
        b.0 = if seen.starts_with(&durable) {
            let extra = self.rng.range(0, (seen.len() - durable.len()) as u64) as usize;
            seen[..durable.len() + extra].to_vec()
        } else if self.rng.percent(50) {
            seen
        } else {
            durable
        };
        b.1 = b.0.clone();
    }

    /// Every message the former primary removed durably or not is held by
    /// the new primary: in its queue (the name durable), counted by its
    /// ledger with a durable staged copy, or delivered.
    fn check_removed(&self) -> Result<(), String> {
        let ledger = self.ledger.lock().expect("ledger lock");
        let pending: HashSet<u128> = ledger.pending().iter().map(|(k, _, _)| *k).collect();
        for (i, key) in self.keys.iter().enumerate() {
            if self.a_present.contains(&i) {
                continue;
            }
            let files = self.disk.files.borrow();
            let in_queue = files
                .iter()
                .any(|(p, f)| f.key == *key && !f.lost && p.starts_with("/b/queue"));
            let staged = pending.contains(key)
                && files
                    .iter()
                    .any(|(p, f)| f.key == *key && !f.lost && p.starts_with(&self.disk.staging));
            if !in_queue && !staged && !self.delivered.contains_key(key) {
                return Err(self.fail(format!(
                    "message {i} ({key:x}) was removed from the former primary but the new primary does not hold it"
                )));
            }
        }
        Ok(())
    }

    fn check_exactly_once(&self) -> Result<(), String> {
        let in_b = self.disk.queue_keys();
        for (i, key) in self.keys.iter().enumerate() {
            let n = usize::from(self.a_present.contains(&i))
                + in_b.iter().filter(|k| *k == key).count()
                + self.delivered.get(key).copied().unwrap_or(0) as usize;
            if n != 1 {
                return Err(self.fail(format!(
                    "message {i} ({key:x}) is held {n} times (former primary {}, new primary's queue {}, delivered {})",
                    self.a_present.contains(&i),
                    in_b.iter().filter(|k| *k == key).count(),
                    self.delivered.get(key).copied().unwrap_or(0)
                )));
            }
        }
        if !self.a_present.is_empty() {
            return Err(self.fail(format!(
                "the former primary still holds {:?} after a push that ended",
                self.a_present
            )));
        }
        Ok(())
    }
}

/// Runs seeds `first..first + n`; the first failing seed and why.
pub fn run_seeds(first: u64, n: u64) -> Result<Outcome, (u64, String)> {
    let mut total = Outcome::default();
    for seed in first..first + n {
        let o = QueueSim::new(seed).run().map_err(|e| (seed, e))?;
        total.add(&o);
    }
    Ok(total)
}
