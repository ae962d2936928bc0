//! Writes into a secondary's replica by anything but hasync: an MTA or an
//! IMAP server left running on the secondary, an operator's script. A
//! secondary's replica is the primary's copy; anything written there
//! locally is either lost at the next reconciliation or, after a failover,
//! a silent divergence. So while a node is secondary it watches its
//! replica roots with fanotify, which names the process behind every
//! change: changes made by this process are its landings; any other pid
//! is foreign.
//!
//! Foreign changes are gathered until they settle ([`SETTLE`]), then
//! handed to the engine as one [`Batch`]. The engine ends the sync session
//! in progress, keeps every foreign file aside as a conflict (handed to
//! the primary like a failover's conflicts, so nothing written is lost),
//! and raises one alarm; the primary's next session puts the replica back
//! to the primary's tree (what was deleted, renamed or re-stamped comes
//! back).
//!
//! Limits: at most [`PENDING_PATHS_MAX`] paths per batch (more are counted
//! and repaired by the reconciliation, not kept aside); a kernel queue
//! overflow is reported the same way. Needs root (fanotify marks and
//! `open_by_handle_at`); without it the watch is off and status says why.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::warn;

use super::Excludes;
use crate::io::fanotify::{self, Fanotify, RawEvent};

/// Quiet time after the last foreign change before a batch is acted on
/// (a writer finishing its file, a rename following a create).
pub const SETTLE: Duration = Duration::from_millis(250);
/// A batch is acted on after this long even if changes keep coming.
pub const BATCH_AGE_MAX: Duration = Duration::from_secs(2);
/// Paths gathered per batch; further ones are only counted.
pub const PENDING_PATHS_MAX: usize = 100_000;
/// Directories outside every replica remembered, so that another process's
/// busy tree elsewhere on the filesystem costs one lookup per directory.
const OUTSIDE_CACHE_MAX: usize = 16_384;
const POLL: Duration = Duration::from_millis(100);
/// Pause after a read that found events, so that the next read takes many
/// at once: while the secondary lands files, each landing raises a few
/// events of its own, and waking per event cost a fifth of a receiving
/// secondary's CPU. Far below [`SETTLE`]; at 100,000 events a second it
/// leaves about 1,000 in the kernel's queue (16,384 before it overflows).
const NAP: Duration = Duration::from_millis(10);

/// One path changed by another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignPath {
    pub store: usize,
    pub rel: PathBuf,
    /// Union of the fanotify event bits seen for it.
    pub mask: u64,
    pub is_dir: bool,
    /// The first process seen changing it, as "pid (comm)".
    pub by: String,
}

impl ForeignPath {
    /// A file (or folder) that a foreign process created or wrote: it holds
    /// data the primary never had, and is kept aside. Deletions, renames
    /// away and attribute changes only need the primary's version back.
    /// Seen only as closed after being opened for writing (an open for
    /// writing reports this even when nothing was written).
    pub fn only_closed_after_write(&self) -> bool {
        !self.is_dir
            && self.mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) == 0
            && self.mask & libc::FAN_CLOSE_WRITE != 0
    }

    pub fn holds_foreign_data(&self) -> bool {
        let added = libc::FAN_CREATE | libc::FAN_MOVED_TO;
        if self.is_dir {
            self.mask & added != 0
        } else {
            self.mask & (added | libc::FAN_CLOSE_WRITE) != 0
        }
    }
}

#[derive(Debug, Default)]
pub struct Batch {
    pub paths: Vec<ForeignPath>,
    /// Foreign events not in `paths` (past the limit of listed paths; one
    /// path may count more than once: the watch keeps no set of them).
    pub unlisted: u64,
    pub overflow: bool,
}

/// The watching thread; dropping it stops the watch.
pub struct ForeignWatch {
    stop: Arc<AtomicBool>,
}

impl Drop for ForeignWatch {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// A replica root to watch: where it is, and hasync's internal directory
/// for it (never reported).
#[derive(Debug, Clone)]
pub struct WatchedRoot {
    pub root: PathBuf,
    pub internal: PathBuf,
}

impl ForeignWatch {
    /// Marks the filesystems of `roots` and starts the thread; batches go to
    /// `tx`. Fails when fanotify is not available (not root).
    pub fn start(
        roots: Vec<WatchedRoot>,
        excludes: Excludes,
        tx: mpsc::Sender<Batch>,
    ) -> std::io::Result<ForeignWatch> {
        let fan = Fanotify::new()?;
        let mut watched = Vec::new();
        for r in roots {
            let root = std::fs::canonicalize(&r.root)?;
            let internal = std::fs::canonicalize(&r.internal).unwrap_or(r.internal.clone());
            fan.mark_filesystem(&root, fanotify::CHANGE_MASK)?;
            let fd = File::open(&root)?;
            let fsid = fanotify::fsid_of(fd.as_fd())?;
            watched.push((root, internal, fd, fsid));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("hasync-foreign".into())
            .spawn(move || watch_loop(fan, watched, excludes, tx, flag))?;
        Ok(ForeignWatch { stop })
    }
}

fn comm(pid: i32) -> String {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "exited".into());
    format!("pid {pid} ({name})")
}

fn watch_loop(
    mut fan: Fanotify,
    roots: Vec<(PathBuf, PathBuf, File, [u8; 8])>,
    excludes: Excludes,
    tx: mpsc::Sender<Batch>,
    stop: Arc<AtomicBool>,
) {
    let me = std::process::id() as i32;
    let mut outside: HashSet<([u8; 8], i32, Vec<u8>)> = HashSet::new();
    let mut pending: BTreeMap<(usize, PathBuf), ForeignPath> = BTreeMap::new();
    let mut names: HashMap<i32, String> = HashMap::new();
    let mut batch = Batch::default();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut events = Vec::new();
    fan.skip_pid(me);
    while !stop.load(Relaxed) {
        events.clear();
        let mut busy = false;
        match fan.read(POLL, &mut events) {
            Ok(read) => {
                busy = read.events > 0;
                if read.overflow {
                    batch.overflow = true;
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                }
            }
            Err(e) => {
                warn!("watching the replica for foreign writes failed: {e}");
                std::thread::sleep(POLL);
            }
        }
        // This process's own events (its landings) were skipped as they were read.
        for ev in &events {
            let Some((store, rel)) = locate(&roots, &mut outside, ev) else {
                continue;
            };
            if excludes.is_excluded(&rel) {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            let key = (store, rel);
            if let Some(p) = pending.get_mut(&key) {
                p.mask |= ev.mask;
                continue;
            }
            if pending.len() >= PENDING_PATHS_MAX {
                batch.unlisted += 1;
                continue;
            }
            let by = names.entry(ev.pid).or_insert_with(|| comm(ev.pid)).clone();
            let rel = key.1.clone();
            pending.insert(
                key,
                ForeignPath {
                    store,
                    rel,
                    mask: ev.mask,
                    is_dir: ev.is_dir(),
                    by,
                },
            );
        }
        let due = first.is_some_and(|f| last.elapsed() >= SETTLE || f.elapsed() >= BATCH_AGE_MAX);
        if due && !stop.load(Relaxed) {
            // One batch waits for the engine at most (it may be waiting out
            // a session's end): meanwhile this one grows, up to its bound,
            // and what is past it is counted.
            match tx.try_reserve() {
                Ok(slot) => {
                    batch.paths = std::mem::take(&mut pending).into_values().collect();
                    slot.send(std::mem::take(&mut batch));
                    names.clear();
                    first = None;
                }
                Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
        if busy {
            std::thread::sleep(NAP);
        }
    }
}

/// Which store and path inside it an event is about, if any.
fn locate(
    roots: &[(PathBuf, PathBuf, File, [u8; 8])],
    outside: &mut HashSet<([u8; 8], i32, Vec<u8>)>,
    ev: &RawEvent,
) -> Option<(usize, PathBuf)> {
    if ev.is_dir() && ev.mask & libc::FAN_MOVED_TO != 0 {
        // A folder moved: one that was outside may now be inside.
        outside.clear();
    }
    let key = (ev.fsid, ev.handle_type, ev.handle.clone());
    if outside.contains(&key) {
        return None;
    }
    let dir = roots
        .iter()
        .find_map(|(_, _, fd, fsid)| fanotify::dir_path(fd.as_fd(), *fsid, ev))?;
    let full = if ev.name.is_empty() {
        dir.clone()
    } else {
        dir.join(&ev.name)
    };
    for (i, (root, internal, _, _)) in roots.iter().enumerate() {
        if dir.starts_with(internal) || full.starts_with(internal) {
            return None;
        }
        if let Ok(rel) = full.strip_prefix(root) {
            if rel.as_os_str().is_empty() {
                return None; // the root itself: its own metadata follows the primary's
            }
            return Some((i, rel.to_path_buf()));
        }
    }
    if !roots.iter().any(|(root, _, _, _)| root.starts_with(&dir)) {
        if outside.len() >= OUTSIDE_CACHE_MAX {
            outside.clear();
        }
        outside.insert(key);
    }
    None
}

/// One line for the alarm: how many paths, by whom, a few examples.
pub fn describe(store_names: &[String], batch: &Batch, kept: usize) -> String {
    let mut by: Vec<&str> = batch.paths.iter().map(|p| p.by.as_str()).collect();
    by.sort_unstable();
    by.dedup();
    let examples: Vec<String> = batch
        .paths
        .iter()
        .take(3)
        .map(|p| {
            let store = store_names.get(p.store).map_or("?", |s| s.as_str());
            format!("{store}:{}", p.rel.display())
        })
        .collect();
    let mut s = format!(
        "the replica was changed outside hasync: {}{} path(s) by {} (e.g. {}); {} kept aside as conflicts (files or whole new folders, handed to the primary), the primary's tree is restored",
        if batch.unlisted > 0 || batch.overflow { "at least " } else { "" },
        batch.paths.len(),
        if by.is_empty() { "an unknown process".to_string() } else { by.join(", ") },
        if examples.is_empty() { "-".to_string() } else { examples.join(", ") },
        kept,
    );
    if batch.unlisted > 0 || batch.overflow {
        s.push_str(&format!(
            "; more changes could not be listed ({}{}) and are repaired from the primary, not kept aside",
            if batch.unlisted > 0 {
                format!("{} event(s) past the first {PENDING_PATHS_MAX} paths", batch.unlisted)
            } else {
                String::new()
            },
            match (batch.overflow, batch.unlisted > 0) {
                (true, true) => "; the kernel's event queue overflowed",
                (true, false) => "the kernel's event queue overflowed",
                _ => "",
            }
        ));
    }
    s.push_str(
        "; stop whatever writes into the secondary's mailstores (is the MTA still running here?)",
    );
    s
}

/// Whether `rel` lies inside one of the paths already kept aside.
pub fn inside_kept(kept: &[(usize, PathBuf)], store: usize, rel: &Path) -> bool {
    kept.iter().any(|(s, p)| *s == store && rel.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(unlisted: u64, overflow: bool) -> Batch {
        Batch {
            paths: (0..2)
                .map(|i| ForeignPath {
                    store: 0,
                    rel: PathBuf::from(format!("u/new/{i}")),
                    mask: libc::FAN_CREATE,
                    is_dir: false,
                    by: "42 (postfix)".into(),
                })
                .collect(),
            unlisted,
            overflow,
        }
    }

    #[test]
    fn the_alarm_counts_paths_and_says_what_it_could_not_list() {
        let names = vec!["inbox".to_string()];
        let all = describe(&names, &batch(0, false), 2);
        assert!(all.contains(": 2 path(s) by 42 (postfix)"), "{all}");
        assert!(!all.contains("could not be listed"), "{all}");
        let past = describe(&names, &batch(5, false), 2);
        assert!(past.contains(": at least 2 path(s)"), "{past}");
        assert!(
            past.contains("(5 event(s) past the first 100000 paths)"),
            "{past}"
        );
        let lost = describe(&names, &batch(0, true), 2);
        assert!(
            lost.contains("(the kernel's event queue overflowed)"),
            "{lost}"
        );
        let both = describe(&names, &batch(5, true), 2);
        assert!(
            both.contains(
                "(5 event(s) past the first 100000 paths; the kernel's event queue overflowed)"
            ),
            "{both}"
        );
    }
}
