//! The inotify side: the watch map, event decoding, and the reader thread.
//!
//! [`Decoder::handle`] turns one raw event into ops and is fed synthetic events in tests; the
//! thread ([`run`]) only polls, reads, decodes and sends.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::mem::MaybeUninit;
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

use super::{rename_op, Filter, Op, Producer, RelPath, Shared, TrackerError};

/// How long the thread sleeps in poll before checking for stop: bounds `Tracker::stop` latency.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a MOVED_FROM waits for its MOVED_TO. The kernel queues the pair back to back, so
/// only a read that races the rename splits them; anything later was a move out of the tree.
const MOVE_PAIR_WAIT: Duration = Duration::from_millis(10);
/// MOVED_FROMs waiting for their pair; past this the oldest is taken as a move out.
const MOVES_PENDING_MAX: usize = 4096;
/// Folders made whose watch found nothing under their name, remembered
/// until a rename of a folder above them says where they went; past this
/// the oldest is given up: such a folder stays unwatched until an overflow
/// or a restart watches every folder again (a comparison with the replica
/// still finds what it holds). Entries of folders deleted since stay here
/// until pushed out.
const LOST_FOLDERS_MAX: usize = 1024;
/// Folders whose watch failed, remembered to be tried again; past this a
/// failure is only counted (its store's periodic verification finds what
/// changed there).
const UNWATCHED_MAX: usize = 65_536;
/// How soon folders whose watch failed are tried again; while any stays
/// unwatched the wait doubles, up to [`WATCH_RETRY_WAIT_MAX_TIMES`] this,
/// and at each retry the stores are compared with the replica (changes
/// in an unwatched folder have no events).
pub(crate) const WATCH_RETRY_EVERY: Duration = Duration::from_secs(30);
/// The longest wait between retries, in [`WATCH_RETRY_EVERY`]s (5 min).
const WATCH_RETRY_WAIT_MAX_TIMES: u32 = 10;
/// Folders whose failure is warned of one by one; the rest are counted.
const UNWATCHED_WARNED_MAX: usize = 10;
/// One read; the kernel needs 16 bytes + NAME_MAX + 1 per event at most, so this never truncates.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Events decoded between two sends, so a flood cannot starve the consumer or the stop flag.
const BATCH_EVENTS_MAX: usize = 16 * 1024;
/// A read that comes less than this after the thread went back to waiting
/// (events come faster than one per millisecond) makes the thread pause
/// [`BUSY_PAUSE`] after sending what it read, so that the next read takes
/// several changes at once instead of waking (and waking the engine) for
/// each event. A change arriving alone is read at once, as before; under
/// load a change waits at most this long.
const BUSY_READ_GAP: Duration = Duration::from_millis(1);
const BUSY_PAUSE: Duration = Duration::from_millis(1);
/// Folders whose path below their root is longer than this are not watched
/// (nor replicated: see `replica::tree`); the sender's scans report them.
const REL_PATH_BYTES_MAX: usize = crate::replica::tree::REL_PATH_BYTES_MAX;

fn watch_mask() -> WatchFlags {
    WatchFlags::CLOSE_WRITE
        | WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::ATTRIB
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::EXCL_UNLINK
}

/// One inotify event, owned.
#[derive(Debug, Clone)]
pub(crate) struct RawEvent {
    pub(crate) wd: i32,
    pub(crate) mask: ReadFlags,
    pub(crate) cookie: u32,
    pub(crate) name: Option<OsString>,
}

/// A MOVED_FROM waiting for the MOVED_TO with the same cookie.
struct PendingMove {
    cookie: u32,
    store: usize,
    rel: RelPath,
    is_dir: bool,
    /// Watches at or under `rel` when it moved; only these follow the rename.
    wds: Vec<i32>,
    since: Instant,
    deadline: Instant,
}

/// Watch map and event decoding. Owned by the reader thread.
pub(crate) struct Decoder {
    fd: OwnedFd,
    /// Canonical store roots, index = store.
    roots: Vec<PathBuf>,
    /// The roots, opened: folders are listed (and, past `PATH_MAX` from
    /// `/`, watched) through them, whatever their depth.
    root_fds: Vec<Option<OwnedFd>>,
    filter: Arc<Filter>,
    shared: Arc<Shared>,
    by_wd: HashMap<i32, (usize, RelPath)>,
    /// The folder each watch is on (device, inode), as it was watched.
    watched_inos: HashMap<i32, (u64, u64)>,
    /// Per store; ordered so a directory's watches are one range.
    by_path: Vec<BTreeMap<RelPath, i32>>,
    moves: VecDeque<PendingMove>,
    /// This turn found a folder gone from under its name before its watch
    /// (its new name comes with a rename not read yet): the thread does not
    /// say it has read past this turn's read (see `Shared::read_upto`).
    unsettled: bool,
    /// Folders made (or moved in) whose watch found nothing: the watch of
    /// the folder they were made in, and their name. A folder above was
    /// renamed before the event was read (the folder lives on under the new
    /// name, unwatched) or it was deleted; the rename, queued after, finds
    /// them again.
    lost: VecDeque<(i32, OsString)>,
    /// Folders whose watch (or listing) failed, to be tried again at
    /// `retry_at` (see [`WATCH_RETRY_EVERY`]).
    unwatched: BTreeSet<(usize, RelPath)>,
    retry_at: Option<Instant>,
    retry_every: Duration,
    /// The wait before the next retry (doubling while folders stay
    /// unwatched; back to `retry_every` when one newly fails).
    retry_wait: Duration,
}

impl Decoder {
    pub(crate) fn new(
        roots: Vec<PathBuf>,
        filter: Arc<Filter>,
        shared: Arc<Shared>,
    ) -> Result<Decoder, TrackerError> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|errno| TrackerError::Init { errno })?;
        let root_fds = roots
            .iter()
            .map(|r| {
                rustix::fs::open(
                    r,
                    rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .ok()
            })
            .collect();
        Ok(Decoder {
            fd,
            by_path: roots.iter().map(|_| BTreeMap::new()).collect(),
            root_fds,
            roots,
            filter,
            shared,
            by_wd: HashMap::new(),
            watched_inos: HashMap::new(),
            moves: VecDeque::new(),
            unsettled: false,
            lost: VecDeque::new(),
            unwatched: BTreeSet::new(),
            retry_at: None,
            retry_every: crate::failpoint::wait_or("WATCH_RETRY", WATCH_RETRY_EVERY),
            retry_wait: Duration::ZERO,
        })
    }

    /// Watches a root itself (not what is below it: see
    /// [`Decoder::watch_below_roots`]); failing is fatal.
    pub(crate) fn watch_root(&mut self, store: usize) -> Result<(), TrackerError> {
        let root = &self.roots[store];
        let wd = inotify::add_watch(&self.fd, root, watch_mask()).map_err(|errno| {
            TrackerError::WatchRoot {
                path: root.clone(),
                errno,
            }
        })?;
        self.set_watch(wd, store, RelPath::new());
        Ok(())
    }

    /// A root and everything below it, at once.
    #[cfg(test)]
    pub(crate) fn watch_store(
        &mut self,
        store: usize,
        out: &mut Vec<Op>,
    ) -> Result<(), TrackerError> {
        self.watch_root(store)?;
        self.watch_tree(store, RelPath::new(), None, out);
        Ok(())
    }

    /// The first watch of every folder below the roots (watched already),
    /// saying each to `watching` as it is watched, until `stop`. Returns
    /// the rescans its failures need (the caller ends the first watch once
    /// they are queued).
    pub(crate) fn watch_below_roots(
        &mut self,
        watching: &super::Watching,
        stop: &AtomicBool,
    ) -> Vec<Op> {
        let mut out = Vec::new();
        for store in 0..self.roots.len() {
            let mut each = |rel: &Path, watched: bool| {
                if watched {
                    watching.watched(store, rel);
                }
                !stop.load(Ordering::Relaxed)
            };
            if !self.watch_tree_then(store, RelPath::new(), None, &mut out, &mut each) {
                break;
            }
        }
        out
    }

    /// Decodes one event into `out`.
    pub(crate) fn handle(&mut self, ev: RawEvent, now: Instant, out: &mut Vec<Op>) {
        Shared::add(&self.shared.events, 1);
        if ev.mask.contains(ReadFlags::QUEUE_OVERFLOW) {
            self.on_overflow(now, out);
            return;
        }
        if ev.mask.contains(ReadFlags::IGNORED) {
            self.forget(ev.wd);
            return;
        }
        // Events for a watch already dropped (queued before the removal) carry nothing new.
        let Some((store, dir)) = self.by_wd.get(&ev.wd).cloned() else {
            return;
        };
        let gone = ReadFlags::DELETE_SELF | ReadFlags::UNMOUNT;
        if ev.mask.intersects(gone | ReadFlags::MOVE_SELF) {
            // Below the root, the parent's DELETE/MOVED_* already said it; the root has no parent.
            if dir.as_os_str().is_empty() || ev.mask.contains(ReadFlags::UNMOUNT) {
                let what = if ev.mask.contains(ReadFlags::MOVE_SELF) {
                    "moved"
                } else {
                    "deleted or unmounted"
                };
                let path = self.roots[store].join(&dir);
                tracing::warn!(store, path = %path.display(), "watched store directory {what}");
                let reason = format!("{} was {what}", path.display());
                self.rescan(store, reason, now, out);
            }
            if ev.mask.intersects(gone) {
                self.forget(ev.wd);
            }
            return;
        }
        // A directory's own events (no name) are also reported, named, to its parent's watch.
        let Some(name) = ev.name else {
            return;
        };
        let rel = dir.join(name);
        let is_dir = ev.mask.contains(ReadFlags::ISDIR);

        if ev.mask.contains(ReadFlags::MOVED_FROM) {
            self.begin_move(ev.cookie, store, rel, is_dir, now, out);
        } else if ev.mask.contains(ReadFlags::MOVED_TO) {
            match self.moves.iter().position(|m| m.cookie == ev.cookie) {
                Some(i) => {
                    let Some(from) = self.moves.remove(i) else {
                        return;
                    };
                    if from.store == store {
                        self.on_rename(from, rel, out);
                    } else {
                        // Between two stores on one filesystem: a delete here, a new path there
                        // (seen: no rescan for where it went).
                        self.moved_out_to(from, true, out);
                        self.moved_in(store, ev.wd, rel, is_dir, now, out);
                    }
                }
                None => self.moved_in(store, ev.wd, rel, is_dir, now, out),
            }
        } else if ev.mask.contains(ReadFlags::CREATE) {
            if self.filter.excluded(&rel) {
                return;
            }
            if is_dir {
                self.sync(store, rel.clone(), now, out);
                self.watch_new(store, ev.wd, rel, now, out);
            } else {
                // Every new name, at once: a hard link or symlink gets no
                // IN_CLOSE_WRITE, and a name linked in and then left alone
                // (Maildir delivery by qmail and Postfix: link tmp/ → new/,
                // unlink tmp/) shows one link by the time this is read,
                // like a file still being written. A file that is being
                // written is read again at its IN_CLOSE_WRITE (the two
                // syncs merge while the first is still queued).
                self.sync(store, rel, now, out);
            }
        } else if ev
            .mask
            .intersects(ReadFlags::CLOSE_WRITE | ReadFlags::DELETE | ReadFlags::ATTRIB)
        {
            self.sync(store, rel, now, out);
        }
    }

    /// Unpaired MOVED_FROMs older than their wait become moves out of the tree.
    pub(crate) fn expire_moves(&mut self, now: Instant, out: &mut Vec<Op>) {
        while self.moves.front().is_some_and(|m| m.deadline <= now) {
            if let Some(m) = self.moves.pop_front() {
                self.moved_out(m, out);
            }
        }
    }

    /// Takes every waiting MOVED_FROM as a move out of the tree.
    pub(crate) fn flush_moves(&mut self, out: &mut Vec<Op>) {
        while let Some(m) = self.moves.pop_front() {
            self.moved_out(m, out);
        }
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        match self.moves.front() {
            Some(m) => POLL_INTERVAL.min(m.deadline.saturating_duration_since(now)),
            None => POLL_INTERVAL,
        }
    }

    fn sync(&self, store: usize, rel: RelPath, since: Instant, out: &mut Vec<Op>) {
        if !self.filter.excluded(&rel) {
            out.push(Op::Sync { store, rel, since });
        }
    }

    fn rescan(&self, store: usize, reason: String, since: Instant, out: &mut Vec<Op>) {
        Shared::add(&self.shared.rescans, 1);
        out.push(Op::Rescan {
            store,
            reason,
            since,
        });
    }

    fn on_overflow(&mut self, now: Instant, out: &mut Vec<Op>) {
        // The MOVED_TOs these wait for may be among the lost events.
        self.flush_moves(out);
        // Every folder is watched again below.
        self.lost.clear();
        Shared::add(&self.shared.overflows, 1);
        tracing::warn!(
            stores = self.roots.len(),
            "inotify queue overflowed (IN_Q_OVERFLOW); rescanning every store"
        );
        for store in 0..self.roots.len() {
            // The lost events may have made folders (never watched) or
            // renamed watched ones (their paths stale): every folder is
            // watched again, under the name it has now. What changed is
            // the rescan's to find.
            self.watch_tree(store, RelPath::new(), None, out);
            let reason = "inotify queue overflowed (IN_Q_OVERFLOW)".to_string();
            self.rescan(store, reason, now, out);
        }
    }

    fn begin_move(
        &mut self,
        cookie: u32,
        store: usize,
        rel: RelPath,
        is_dir: bool,
        now: Instant,
        out: &mut Vec<Op>,
    ) {
        if self.moves.len() >= MOVES_PENDING_MAX {
            if let Some(oldest) = self.moves.pop_front() {
                self.moved_out(oldest, out);
            }
        }
        let wds = if is_dir {
            self.watches_under(store, &rel)
        } else {
            Vec::new()
        };
        self.moves.push_back(PendingMove {
            cookie,
            store,
            rel,
            is_dir,
            wds,
            since: now,
            deadline: now + MOVE_PAIR_WAIT,
        });
    }

    fn on_rename(&mut self, from: PendingMove, to: RelPath, out: &mut Vec<Op>) {
        let store = from.store;
        let both_in = !self.filter.excluded(&from.rel) && !self.filter.excluded(&to);
        // Folders whose watch failed go with it: tried again where they
        // are (a folder made again at the old name meanwhile is another
        // folder). Not when the folder watched under the old name is still
        // there (below): what was remembered under it is its own.
        if from.is_dir
            && !(both_in && !from.wds.is_empty() && self.still_under_old_name(store, &from.rel))
        {
            self.follow_unwatched(store, &from.rel, both_in.then_some(to.as_path()));
        }
        if from.is_dir && both_in && from.wds.is_empty() {
            // Never watched: made and renamed before its IN_CREATE was read
            // (the watch for the old name found nothing). Watched now under
            // its new name, and what it holds reported after the rename.
            let since = from.since;
            out.extend(rename_op(&self.filter, store, from.rel, to.clone(), since));
            self.watch_tree(store, to, Some(since), out);
            return;
        }
        if from.is_dir && both_in && self.still_under_old_name(store, &from.rel) {
            // The folder watched under the old name is still there: the
            // one renamed was made, renamed and its name made again before
            // its IN_CREATE was read, and the watch taken for that event is
            // on the new one. It keeps its name; the renamed folder is
            // watched under its new name, and what it holds reported.
            let since = from.since;
            out.extend(rename_op(&self.filter, store, from.rel, to.clone(), since));
            self.watch_tree(store, to, Some(since), out);
            return;
        }
        let mut look_again = false;
        if from.is_dir {
            match (self.filter.excluded(&from.rel), self.filter.excluded(&to)) {
                (false, false) => {
                    self.remap(store, &from.rel, &to, &from.wds);
                    look_again = true;
                }
                (false, true) => self.unwatch(store, &from.rel, &from.wds),
                (true, false) => self.watch_tree(store, to.clone(), Some(from.since), out),
                (true, true) => {}
            }
        }
        out.extend(rename_op(&self.filter, store, from.rel, to, from.since));
        if look_again {
            // After the rename: what they hold is reported under its new
            // name (before it, the replica would make the new name first
            // and refuse the rename).
            self.find_lost(store, &from.wds, from.since, out);
        }
    }

    fn moved_out(&mut self, from: PendingMove, out: &mut Vec<Op>) {
        self.moved_out_to(from, false, out);
    }

    /// [`Decoder::moved_out`]; `seen`: where it went is known (another
    /// store).
    fn moved_out_to(&mut self, from: PendingMove, seen: bool, out: &mut Vec<Op>) {
        if from.is_dir {
            // Still watched where it went: its events would be misattributed to the old path.
            self.unwatch(from.store, &from.rel, &from.wds);
        }
        // Where it went may be a folder of the store the tracker cannot
        // watch (no event comes from there): the store is compared, so that
        // the replica keeps the old name until the comparison has looked
        // (the sender makes no delete sure while a rescan is ahead of it).
        let unseen = !seen && !self.filter.excluded(&from.rel) && self.unwatched_in(from.store);
        let (store, since) = (from.store, from.since);
        if unseen {
            tracing::debug!(store, path = %from.rel.display(), "moved out while folders of its store are not watched: rescanning");
        }
        self.sync(from.store, from.rel, from.since, out);
        if unseen {
            let reason = "an entry moved out while folders cannot be watched".to_string();
            self.rescan(store, reason, since, out);
        }
    }

    /// Whether a folder of `store` is remembered as not watched.
    fn unwatched_in(&self, store: usize) -> bool {
        !self.unwatched.is_empty()
            && self
                .unwatched
                .range((store, RelPath::new())..)
                .next()
                .is_some_and(|(s, _)| *s == store)
    }

    fn moved_in(
        &mut self,
        store: usize,
        parent_wd: i32,
        rel: RelPath,
        is_dir: bool,
        now: Instant,
        out: &mut Vec<Op>,
    ) {
        if self.filter.excluded(&rel) {
            return;
        }
        self.sync(store, rel.clone(), now, out);
        if is_dir {
            self.watch_new(store, parent_wd, rel, now, out);
        }
    }

    /// Watches a folder new here (made or moved in, reported by the watch
    /// `parent_wd`) and reports what it holds. If nothing is under its
    /// name any more, a folder above may have been renamed before this
    /// event was read: the folder is remembered, and that rename (queued
    /// after this event) watches it under its new name.
    fn watch_new(
        &mut self,
        store: usize,
        parent_wd: i32,
        rel: RelPath,
        now: Instant,
        out: &mut Vec<Op>,
    ) {
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return;
        };
        // The parent's name may hold another folder by now than the one
        // whose watch reported this (that one renamed away and the name
        // made again before the event was read): the new folder is in the
        // renamed one. Watching the name would watch the other folder's
        // entry under it (or nothing) and leave the new folder unwatched.
        // (Gone or not a folder: the same. Any other error cannot tell, and
        // the folder is watched by name as before the check.)
        if let Some(&reported_by) = self.watched_inos.get(&parent_wd) {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let moved = match self.folder_id(store, parent) {
                Ok(id) => id != reported_by,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => true,
                Err(_) => false,
            };
            if moved {
                self.remember_lost(parent_wd, name);
                return;
            }
        }
        self.watch_tree(store, rel.clone(), Some(now), out);
        if self.by_path[store].contains_key(&rel) {
            return;
        }
        self.remember_lost(parent_wd, name);
    }

    /// Whether the folder watched under `rel` is (by device and inode) the
    /// one under that name now.
    fn still_under_old_name(&self, store: usize, rel: &Path) -> bool {
        let Some(wd) = self.by_path[store].get(rel) else {
            return false;
        };
        match self.watched_inos.get(wd) {
            Some(id) => self.folder_id(store, rel).as_ref() == Ok(id),
            None => false,
        }
    }

    /// A folder made in the folder watched by `wd` that is not under its
    /// name there: a later rename of that folder looks for it.
    fn remember_lost(&mut self, wd: i32, name: OsString) {
        // Renamed before its watch: its new name is reported only when that
        // rename is read, after this read.
        self.unsettled = true;
        if self.lost.len() >= LOST_FOLDERS_MAX {
            self.lost.pop_front();
        }
        self.lost.push_back((wd, name));
    }

    fn folder_id(&self, store: usize, rel: &Path) -> Result<(u64, u64), Errno> {
        self.lister().folder_id(store, rel)
    }

    /// A folder renamed carried the watches `wds` (now under their new
    /// names): a folder remembered as made in one of them and found nothing
    /// is looked for again there, watched, and what it holds reported.
    fn find_lost(&mut self, store: usize, wds: &[i32], since: Instant, out: &mut Vec<Op>) {
        if self.lost.is_empty() {
            return;
        }
        let (found, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.lost)
            .into_iter()
            .partition(|(wd, _)| wds.contains(wd));
        self.lost = kept;
        for (wd, name) in found {
            let Some((s, parent)) = self.by_wd.get(&wd).cloned() else {
                continue;
            };
            let rel = parent.join(name);
            if s != store || self.filter.excluded(&rel) || self.by_path[s].contains_key(&rel) {
                continue;
            }
            tracing::debug!(store, path = %rel.display(), "a folder made before a rename above it was read: watched under its new name");
            self.sync(store, rel.clone(), since, out);
            self.watch_tree(store, rel.clone(), Some(since), out);
            if !self.by_path[store].contains_key(&rel) {
                // Not there either (renamed on since): the next rename of
                // its folder looks again.
                self.remember_lost(wd, rel.file_name().unwrap_or_default().to_os_string());
            }
        }
    }

    /// Watches at or under `dir`.
    fn watches_under(&self, store: usize, dir: &Path) -> Vec<i32> {
        self.by_path[store]
            .range::<Path, _>((Bound::Included(dir), Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(dir))
            .map(|(_, wd)| *wd)
            .collect()
    }

    /// Points the watches that moved with a directory at their new paths.
    fn remap(&mut self, store: usize, from: &Path, to: &Path, wds: &[i32]) {
        for &wd in wds {
            let new = match self.by_wd.get(&wd) {
                Some((s, p)) if *s == store => match p.strip_prefix(from) {
                    Ok(suffix) => to.join(suffix),
                    Err(_) => continue,
                },
                _ => continue,
            };
            self.set_watch(wd, store, new);
        }
    }

    /// Drops the watches that were under `dir` and still are.
    fn unwatch(&mut self, store: usize, dir: &Path, wds: &[i32]) {
        for &wd in wds {
            let still_there =
                matches!(self.by_wd.get(&wd), Some((s, p)) if *s == store && p.starts_with(dir));
            if still_there {
                // EINVAL means the kernel already dropped it; either way it is gone.
                let _ = inotify::remove_watch(&self.fd, wd);
                self.forget(wd);
            }
        }
    }

    fn set_watch(&mut self, wd: i32, store: usize, rel: RelPath) {
        // The kernel hands back the existing wd for an inode already watched (a directory that
        // moved away and back): re-point it rather than keep two paths for one watch.
        if let Some((old_store, old_rel)) = self.by_wd.insert(wd, (store, rel.clone())) {
            let paths = &mut self.by_path[old_store];
            if (old_store, &old_rel) != (store, &rel) && paths.get(&old_rel) == Some(&wd) {
                paths.remove(&old_rel);
            }
        }
        self.by_path[store].insert(rel, wd);
        self.publish_watches();
    }

    fn forget(&mut self, wd: i32) {
        self.watched_inos.remove(&wd);
        if let Some((store, rel)) = self.by_wd.remove(&wd) {
            if self.by_path[store].get(&rel) == Some(&wd) {
                self.by_path[store].remove(&rel);
            }
        }
        self.publish_watches();
    }

    fn publish_watches(&self) {
        let n = self.by_wd.len() as u64;
        self.shared.watches.store(n, Ordering::Relaxed);
    }

    /// Watches `rel` and every directory below it. Watch before listing, so a subdirectory created
    /// meanwhile is either listed or reported by the new watch.
    /// Watches `rel` and every directory under it. With `report` (a tree
    /// that is new here), also reports every entry found under it: entries
    /// made before their directory's watch existed have no event of their
    /// own, and the listing after the watch is added is the only place that
    /// sees them (an earlier listing, such as a comparison's scan, may have
    /// run before they were made).
    fn watch_tree(
        &mut self,
        store: usize,
        rel: RelPath,
        report: Option<Instant>,
        out: &mut Vec<Op>,
    ) {
        self.watch_tree_then(store, rel, report, out, &mut |_, _| true);
    }

    /// [`Decoder::watch_tree`], telling `each` every folder it came to
    /// and whether it is watched now; stops (returning `false`) when
    /// `each` says so.
    fn watch_tree_then(
        &mut self,
        store: usize,
        rel: RelPath,
        report: Option<Instant>,
        out: &mut Vec<Op>,
        each: &mut dyn FnMut(&Path, bool) -> bool,
    ) -> bool {
        let mut stack = vec![rel];
        while let Some(rel) = stack.pop() {
            let found = self.lister().watch_one(store, &rel, report.is_some());
            let watched = matches!(found, Found::Watched { .. });
            let mut folders = self.take_found(store, &rel, found, report, out);
            if !each(&rel, watched) {
                return false;
            }
            // Entered in path order (the smallest name popped first), as
            // the walks and the warming threads go (`replica::warm`): on a
            // cold cache this follows the reads already in flight.
            folders.sort_unstable_by(|a, b| b.cmp(a));
            stack.append(&mut folders);
        }
        true
    }

    /// Records what watching folder `rel` found; returns its folders.
    fn take_found(
        &mut self,
        store: usize,
        rel: &RelPath,
        found: Found,
        report: Option<Instant>,
        out: &mut Vec<Op>,
    ) -> Vec<RelPath> {
        match found {
            Found::Skip => {
                // A folder to report gone from under its name before its
                // watch: where it went is reported by a rename not read yet.
                self.unsettled |= report.is_some();
                self.watched_again(store, rel, out);
                Vec::new()
            }
            Found::Failed(why) => {
                self.watch_failed(store, rel, &why, out);
                Vec::new()
            }
            Found::Watched {
                wd,
                sure,
                entries,
                failed,
            } => {
                match sure {
                    Some(id) => self.watched_inos.insert(wd, id),
                    None => self.watched_inos.remove(&wd),
                };
                self.set_watch(wd, store, rel.clone());
                let mut folders = Vec::new();
                for (child, is_dir) in entries {
                    if let Some(since) = report {
                        self.sync(store, child.clone(), since, out);
                    }
                    if is_dir {
                        folders.push(child);
                    }
                }
                match failed {
                    Some(why) => self.watch_failed(store, rel, &why, out),
                    None => self.watched_again(store, rel, out),
                }
                folders
            }
        }
    }

    fn lister(&self) -> Lister<'_> {
        Lister {
            fd: &self.fd,
            roots: &self.roots,
            root_fds: &self.root_fds,
            filter: &self.filter,
        }
    }

    /// Watching (or listing) folder `rel` failed: it is rescanned now (once:
    /// not at every failed retry), and tried again every
    /// [`WATCH_RETRY_EVERY`] (the wait doubling), the stores compared with
    /// the replica at each retry while any stays unwatched.
    pub(super) fn watch_failed(
        &mut self,
        store: usize,
        rel: &RelPath,
        why: &str,
        out: &mut Vec<Op>,
    ) {
        Shared::add(&self.shared.watch_failures, 1);
        let key = (store, rel.clone());
        let abs = self.roots[store].join(rel);
        let reason = format!("cannot watch {}: {why}", abs.display());
        if self.unwatched.contains(&key) {
            tracing::debug!(store, path = %abs.display(), error = why, "still cannot watch directory");
            return;
        }
        if self.unwatched.len() >= UNWATCHED_MAX {
            // Not remembered: rescanned once, as every failure is.
            tracing::debug!(store, path = %abs.display(), error = why, "cannot watch directory (past the bound of folders tried again)");
            self.rescan(store, reason, Instant::now(), out);
            return;
        }
        self.unwatched.insert(key);
        self.shared.note_unwatched(store, rel, true);
        let hint = if why.contains("No space left") || why.contains("NOSPC") {
            " (the inotify watch limit: raise fs.inotify.max_user_watches)"
        } else {
            ""
        };
        match self.unwatched.len() {
            n if n <= UNWATCHED_WARNED_MAX => tracing::warn!(
                store,
                path = %abs.display(),
                error = why,
                "cannot watch directory{hint}; rescanning now and at each retry until it is watched (after {} s, the wait doubling up to {} s)",
                self.retry_every.as_secs(),
                (self.retry_every * WATCH_RETRY_WAIT_MAX_TIMES).as_secs()
            ),
            n if n == UNWATCHED_WARNED_MAX + 1 => tracing::warn!(
                store,
                error = why,
                "more directories cannot be watched{hint}; counted in status (unwatched_folders), not logged one by one"
            ),
            _ => tracing::debug!(store, path = %abs.display(), error = why, "cannot watch directory"),
        }
        self.retry_wait = self.retry_every;
        self.retry_at
            .get_or_insert(Instant::now() + self.retry_every);
        self.rescan(store, reason, Instant::now(), out);
    }

    /// Folders remembered as not watched at or under `from` are remembered
    /// under `to` instead (renamed with a folder above them), or forgotten
    /// (`None`: moved out of what is replicated).
    fn follow_unwatched(&mut self, store: usize, from: &Path, to: Option<&Path>) {
        if self.unwatched.is_empty() {
            return;
        }
        // In path order, what is under `from` follows it.
        let moved: Vec<RelPath> = self
            .unwatched
            .range((store, from.to_path_buf())..)
            .take_while(|(s, p)| *s == store && p.starts_with(from))
            .map(|(_, p)| p.clone())
            .collect();
        for p in moved {
            self.unwatched.remove(&(store, p.clone()));
            self.shared.note_unwatched(store, &p, false);
            if let Some(q) = to.and_then(|to| crate::model::moved_path(&p, from, to)) {
                self.shared.note_unwatched(store, &q, true);
                self.unwatched.insert((store, q));
            }
        }
    }

    /// Folder `rel` is watched now, or gone: not tried again. If it was
    /// remembered, its store is compared: what changed in it while it was
    /// not watched had no events (renamed with its folder, it is watched
    /// under the new name before the retry that would compare).
    fn watched_again(&mut self, store: usize, rel: &RelPath, out: &mut Vec<Op>) {
        if !self.unwatched.is_empty() && self.unwatched.remove(&(store, rel.clone())) {
            self.shared.note_unwatched(store, rel, false);
            let reason = format!("{} watched again after its watch failed", rel.display());
            self.rescan(store, reason, Instant::now(), out);
        }
    }

    /// Tries the folders whose watch failed again, if their time has come:
    /// each is watched with what is below it, or gone, or still failing.
    /// Every store that had one is rescanned: what changed in a folder
    /// while it was not watched has no events.
    fn retry_unwatched(&mut self, now: Instant, out: &mut Vec<Op>) {
        if self.retry_at.is_none_or(|t| now < t) {
            return;
        }
        let tried: Vec<(usize, RelPath)> = self.unwatched.iter().cloned().collect();
        let stores: BTreeSet<usize> = tried.iter().map(|(s, _)| *s).collect();
        let mut moved = BTreeSet::new();
        for (store, rel) in tried {
            // Watched meanwhile with a folder above it: still listed again.
            self.watch_tree(store, rel.clone(), None, out);
            let gone = !self.unwatched.contains(&(store, rel.clone()))
                && !self.by_path[store].contains_key(&rel);
            if gone {
                // Deleted, or moved with a folder above it (renamed while
                // it was remembered by its old name): every folder of the
                // store is watched again under the name it has now, as
                // after an overflow.
                moved.insert(store);
            }
        }
        for store in moved {
            self.watch_tree(store, RelPath::new(), None, out);
        }
        let left = self.unwatched.len();
        tracing::info!(
            tried = stores.len(),
            still_unwatched = left,
            "directories whose watch failed tried again; rescanning their stores"
        );
        for store in stores {
            let reason = if left == 0 {
                "directories watched again after their watch failed".to_string()
            } else {
                format!("{left} directories still cannot be watched")
            };
            self.rescan(store, reason, now, out);
        }
        self.retry_wait = (self.retry_wait * 2).min(self.retry_every * WATCH_RETRY_WAIT_MAX_TIMES);
        self.retry_at = (left > 0).then(|| now + self.retry_wait);
    }

    /// Waits up to `timeout` for events, or for a consumer's ask for a
    /// fresh `read_upto` (taken here); false on timeout, ask or signal.
    fn wait_readable(&self, timeout: Duration) -> Result<bool, Errno> {
        let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        });
        let Some(poke) = &self.shared.poke else {
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            return match poll(&mut fds, Some(&timeout)) {
                Ok(n) => Ok(n > 0),
                Err(Errno::INTR) => Ok(false),
                Err(errno) => Err(errno),
            };
        };
        let mut fds = [
            PollFd::new(&self.fd, PollFlags::IN),
            PollFd::new(poke, PollFlags::IN),
        ];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => {
                if fds[1].revents().contains(PollFlags::IN) {
                    let mut count = [0u8; 8];
                    // Non-blocking; a lost race with nothing left is fine.
                    let _ = rustix::io::read(poke, &mut count);
                }
                Ok(fds[0].revents().contains(PollFlags::IN))
            }
            Err(Errno::INTR) => Ok(false),
            Err(errno) => Err(errno),
        }
    }

    /// Whether inotify has nothing queued right now.
    fn nothing_queued(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        matches!(
            poll(
                &mut fds,
                Some(&Timespec {
                    tv_sec: 0,
                    tv_nsec: 0
                })
            ),
            Ok(0)
        )
    }
}

/// Reads what is queued (non-blocking) into `out`, up to about [`BATCH_EVENTS_MAX`].
/// Ok(true) if it read until inotify had nothing left.
fn read_events(
    fd: &OwnedFd,
    buf: &mut [MaybeUninit<u8>],
    out: &mut Vec<RawEvent>,
) -> Result<bool, Errno> {
    let mut reader = inotify::Reader::new(fd, buf);
    loop {
        match reader.next() {
            Ok(ev) => {
                out.push(RawEvent {
                    wd: ev.wd(),
                    mask: ev.events(),
                    cookie: ev.cookie(),
                    name: ev
                        .file_name()
                        .map(|n| std::ffi::OsStr::from_bytes(n.to_bytes()).to_os_string()),
                });
                // Stop only between reads, so a MOVED_FROM/MOVED_TO pair in one read stays together.
                if out.len() >= BATCH_EVENTS_MAX && reader.is_buffer_empty() {
                    return Ok(false);
                }
            }
            Err(Errno::AGAIN) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(errno),
        }
    }
}

/// The reader thread: poll, read, decode, send, until `stop` (or the consumer is gone).
/// What watching one folder found, before any of it is recorded.
enum Found {
    /// Not watched, and nothing to say: gone or replaced already (the
    /// parent's watch reports it), a nested store's, or too long a path.
    Skip,
    /// Not watched: why (a rescan finds what changes below it).
    Failed(String),
    Watched {
        wd: i32,
        /// The folder the watch is surely on (device, inode).
        sure: Option<(u64, u64)>,
        /// Its entries, and which are folders (only folders unless asked).
        entries: Vec<(RelPath, bool)>,
        /// Listing it failed part way: why.
        failed: Option<String>,
    },
}

/// The tracker's read-only part: adds a watch and lists a folder (nothing
/// of the decoder's state changes here).
struct Lister<'a> {
    fd: &'a OwnedFd,
    roots: &'a [PathBuf],
    root_fds: &'a [Option<OwnedFd>],
    filter: &'a Filter,
}

impl Lister<'_> {
    /// Watches folder `rel` of `store`, then lists it (every entry with
    /// `all`, else its folders only).
    fn watch_one(&self, store: usize, rel: &RelPath, all: bool) -> Found {
        let abs = self.roots[store].join(rel);
        // A store nested in this one owns its own subtree.
        if self
            .roots
            .iter()
            .enumerate()
            .any(|(s, r)| s != store && *r == abs)
        {
            return Found::Skip;
        }
        if rel.as_os_str().len() > REL_PATH_BYTES_MAX {
            // Out of reach for replication as well; a rescan cannot help.
            tracing::debug!(
                store,
                bytes = rel.as_os_str().len(),
                "folder path too long to watch"
            );
            return Found::Skip;
        }
        let dir = match self.open_dir(store, rel) {
            Ok(fd) => fd,
            // Gone or replaced already: the parent's watch reports that.
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => return Found::Skip,
            Err(errno) => return Found::Failed(format!("cannot open: {errno}")),
        };
        let by_descriptor = abs.as_os_str().len() > REL_PATH_BYTES_MAX;
        let added = if !by_descriptor {
            inotify::add_watch(self.fd, &abs, watch_mask())
        } else {
            // Past PATH_MAX from `/`: name the folder by its descriptor.
            use std::os::fd::AsRawFd;
            let by_fd = format!("/proc/self/fd/{}", dir.as_raw_fd());
            inotify::add_watch(
                self.fd,
                by_fd.as_str(),
                watch_mask() - WatchFlags::DONT_FOLLOW,
            )
        };
        let wd = match added {
            Ok(wd) => wd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Found::Skip,
            Err(errno) => return Found::Failed(errno.to_string()),
        };
        // The folder the watch is on, if that is sure: added through the
        // descriptor, or by a name that still holds the folder the
        // descriptor opened (else the parent check of the folders made in
        // it is skipped).
        let opened = rustix::fs::fstat(&dir).map(|st| (st.st_dev, st.st_ino));
        let sure = match opened {
            Ok(id) if by_descriptor || self.folder_id(store, rel) == Ok(id) => Some(id),
            _ => None,
        };
        let mut entries = Vec::new();
        let mut listing = match rustix::fs::Dir::new(dir) {
            Ok(l) => l,
            Err(errno) => {
                return Found::Watched {
                    wd,
                    sure,
                    entries,
                    failed: Some(format!("cannot list: {errno}")),
                }
            }
        };
        let mut failed = None;
        while let Some(entry) = listing.read() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(Errno::NOENT) => break,
                Err(errno) => {
                    failed = Some(format!("cannot list: {errno}"));
                    break;
                }
            };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            // d_type, no symlink following: a symlink to a directory is a file here.
            let is_dir = match entry.file_type() {
                rustix::fs::FileType::Directory => true,
                rustix::fs::FileType::Unknown => listing.fd().ok().is_some_and(|d| {
                    rustix::fs::statat(d, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(
                        |st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::Directory
                        },
                    )
                }),
                _ => false,
            };
            // Files are passed over unless asked for (a folder watched at
            // start has thousands): no path made, no exclude matched.
            if !(all || is_dir) {
                continue;
            }
            let child = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if self.filter.excluded(&child) {
                continue;
            }
            entries.push((child, is_dir));
        }
        Found::Watched {
            wd,
            sure,
            entries,
            failed,
        }
    }

    /// Opens folder `rel` of `store` for listing, through the root's
    /// descriptor (any depth), never following a symlink as its last step.
    fn open_dir(&self, store: usize, rel: &Path) -> Result<OwnedFd, Errno> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let arg = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match &self.root_fds[store] {
            Some(root) => rustix::fs::openat(root, arg, flags, Mode::empty()),
            None => rustix::fs::open(self.roots[store].join(rel), flags, Mode::empty()),
        }
    }

    /// The device and inode of the folder at `rel` (not following a
    /// symlink there).
    fn folder_id(&self, store: usize, rel: &Path) -> Result<(u64, u64), Errno> {
        use rustix::fs::{AtFlags, FileType};
        let arg = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let st = match &self.root_fds[store] {
            Some(root) => rustix::fs::statat(root, arg, AtFlags::SYMLINK_NOFOLLOW)?,
            None => rustix::fs::lstat(self.roots[store].join(rel))?,
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(Errno::NOTDIR);
        }
        Ok((st.st_dev, st.st_ino))
    }
}

pub(crate) fn run(mut decoder: Decoder, producer: Producer, stop: Arc<AtomicBool>) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUF_BYTES];
    let mut events = Vec::new();
    let mut ops = Vec::new();
    // When the thread last went back to waiting after a read (after its
    // pause, if it took one: the gap to the next read must not count it).
    let mut waiting_since: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut busy = false;
        let mut read_any = false;
        // Every change made before this has been read (see
        // `Shared::read_upto`), once what was read is decoded and sent and
        // no MOVED_FROM waits for its pair.
        let mut read_upto = None;
        match decoder.wait_readable(decoder.poll_timeout(Instant::now())) {
            Ok(true) => {
                let started = Instant::now();
                let read = read_events(&decoder.fd, &mut buf, &mut events);
                if matches!(read, Ok(true)) {
                    // It read until inotify had nothing left.
                    read_upto = Some(started);
                }
                let now = Instant::now();
                read_any = true;
                busy = waiting_since.is_some_and(|t| now.duration_since(t) < BUSY_READ_GAP);
                for ev in events.drain(..) {
                    decoder.handle(ev, now, &mut ops);
                }
                if let Err(errno) = read {
                    tracing::warn!(%errno, "reading inotify events failed; rescanning every store");
                    for store in 0..decoder.roots.len() {
                        let reason = format!("reading inotify events failed: {errno}");
                        decoder.rescan(store, reason, now, &mut ops);
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
            Ok(false) => {
                let now = Instant::now();
                if decoder.nothing_queued() {
                    read_upto = Some(now);
                }
            }
            Err(errno) => {
                tracing::warn!(%errno, "polling the inotify descriptor failed; retrying");
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        decoder.expire_moves(Instant::now(), &mut ops);
        decoder.retry_unwatched(Instant::now(), &mut ops);
        for op in ops.drain(..) {
            if producer.send(op).is_err() {
                tracing::debug!("change consumer dropped; tracker thread exits");
                return;
            }
        }
        let unsettled = std::mem::take(&mut decoder.unsettled);
        if let Some(at) = read_upto.filter(|_| decoder.moves.is_empty() && !unsettled) {
            let shared = &decoder.shared;
            let before = shared.read_upto();
            shared.set_read_upto(at);
            if before.is_none_or(|b| b < at)
                && shared.read_upto_waited.swap(false, Ordering::AcqRel)
            {
                shared.wake.notify_one();
            }
        }
        if busy {
            std::thread::sleep(BUSY_PAUSE);
        }
        if read_any {
            waiting_since = Some(Instant::now());
        }
    }
}

#[cfg(test)]
impl Decoder {
    pub(crate) fn watched(&self, store: usize, rel: &Path) -> Option<i32> {
        self.by_path[store].get(rel).copied()
    }
}
