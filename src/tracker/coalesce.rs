//! The single consumer: an ordered pending list with per-path dedup.
//!
//! A `Sync` reads the path's state when it is *sent*, so a second `Sync` of a path whose first one
//! is still queued adds nothing — unless a rename touching the path was queued in between, since
//! the replica must see the rename before anything that happened after it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::ops::Bound;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{Op, RelPath, Shared};

/// Past this many queued ops the list collapses into one Rescan per store: a rescan is cheaper
/// than tracking that many paths, and memory stays bounded.
pub(crate) const PENDING_OPS_MAX: usize = 1_000_000;

/// The same past this many bytes of queued ops ([`queued_bytes`]): long names reach it
/// before the count does.
pub(crate) const PENDING_BYTES_MAX: usize = 128 << 20;

/// What a queued op holds: the op and its paths, and a Sync's path once more as its merge
/// key.
fn queued_bytes(op: &Op) -> usize {
    op.held_bytes()
        + match op {
            Op::Sync { rel, .. } => rel.as_os_str().len(),
            Op::Rename { .. } | Op::Rescan { .. } => 0,
        }
}

/// Tombstones (ops moved elsewhere in the list) are compacted away once they exceed both the
/// live count and this floor, so compaction stays amortised.
const COMPACT_TOMBSTONES_MIN: usize = 1024;

/// A queued path's bytes. Ordered byte-wise, a folder's descendants
/// (`dir/…`) are one contiguous range, and a comparison is a `memcmp`
/// instead of `Path`'s walk over components.
type Key = Vec<u8>;

fn key(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Single consumer. Owned by the sending engine's thread; no locks.
pub struct Coalescer {
    rx: Receiver<Op>,
    tx: Sender<Op>,
    shared: Arc<Shared>,
    /// Ops in order; `None` marks an op that was moved later in the list.
    queue: VecDeque<Option<Op>>,
    /// Sequence number of `queue[0]`; an op keeps its sequence number while queued.
    head_seq: u64,
    /// `Some` entries in `queue`.
    live: usize,
    /// Per store, the queued Syncs that later Syncs of the same path may merge into.
    /// A rename fences (removes) the entries it touches.
    syncs: HashMap<usize, BTreeMap<Key, u64>>,
    /// Per store, the queued Rescan, if any.
    rescans: HashMap<usize, u64>,
    /// Sequence number of the last Rename appended: a Sync queued before
    /// it does not take a newer name (the rename may move that name).
    last_rename_seq: Option<u64>,
    pending_ops_max: usize,
    /// Bytes of the live ops in `queue`.
    pending_bytes: usize,
    pending_bytes_max: usize,
    /// The tracker's `read_upto` as a drain that emptied the channel began:
    /// every change made before it has its op in this queue (or taken).
    drained_upto: Option<Instant>,
}

impl Coalescer {
    pub(crate) fn new(
        rx: Receiver<Op>,
        tx: Sender<Op>,
        shared: Arc<Shared>,
        pending_ops_max: usize,
    ) -> Coalescer {
        Coalescer {
            rx,
            tx,
            shared,
            queue: VecDeque::new(),
            head_seq: 0,
            live: 0,
            syncs: HashMap::new(),
            rescans: HashMap::new(),
            last_rename_seq: None,
            pending_ops_max,
            pending_bytes: 0,
            pending_bytes_max: PENDING_BYTES_MAX,
            drained_upto: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_pending_bytes_max(mut self, bytes: usize) -> Coalescer {
        self.pending_bytes_max = bytes;
        self
    }

    /// A coalescer with no tracker behind it (ops come only from `push`):
    /// for simulators.
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn detached(stores: usize) -> Coalescer {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(stores, super::CHANNEL_OPS_MAX));
        Coalescer::new(rx, tx, shared, PENDING_OPS_MAX)
    }

    /// Moves everything queued in the channel into the ordered pending list, coalescing.
    pub fn drain(&mut self) {
        let upto = self.shared.read_upto();
        // Bounded so a producer outpacing us cannot keep this call from returning.
        for _ in 0..self.shared.channel_ops_max {
            match self.rx.try_recv() {
                Ok(op) => {
                    self.shared.received(&op);
                    self.push(op)
                }
                Err(_) => {
                    self.drained_upto = upto.max(self.drained_upto);
                    break;
                }
            }
        }
        self.recover_lost();
    }

    /// Blocks up to `timeout` for the first event if nothing is pending, then drains.
    /// Returns true if anything is pending.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        if self.live == 0 {
            self.recover_lost();
        }
        if self.live == 0 {
            match self.rx.recv_timeout(timeout) {
                Ok(op) => {
                    self.shared.received(&op);
                    self.push(op)
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
            }
        }
        self.drain();
        self.live > 0
    }

    /// Removes and returns up to `max` ops in order.
    pub fn take_batch(&mut self, max: usize) -> Vec<Op> {
        let mut out = Vec::with_capacity(max.min(self.live));
        while out.len() < max {
            let Some(slot) = self.queue.pop_front() else {
                break;
            };
            let seq = self.head_seq;
            self.head_seq += 1;
            let Some(op) = slot else { continue };
            self.live -= 1;
            self.pending_bytes -= queued_bytes(&op);
            match &op {
                Op::Sync { store, rel, .. } => {
                    if let Some(paths) = self.syncs.get_mut(store) {
                        if paths.get(key(rel)) == Some(&seq) {
                            paths.remove(key(rel));
                        }
                    }
                }
                Op::Rescan { store, .. } => {
                    if self.rescans.get(store) == Some(&seq) {
                        self.rescans.remove(store);
                    }
                }
                Op::Rename { .. } => {}
            }
            out.push(op);
        }
        self.publish();
        out
    }

    /// Lets the engine inject ops (re-requests, manifest differences); same coalescing rules.
    pub fn push(&mut self, op: Op) {
        match op {
            Op::Sync { store, rel, since } => self.push_sync(store, rel, since),
            Op::Rename {
                store,
                from,
                to,
                since,
            } => self.push_rename(store, from, to, since),
            Op::Rescan {
                store,
                reason,
                since,
            } => self.push_rescan(store, reason, since),
        }
        self.compact_if_sparse();
        if self.queue.len() > self.pending_ops_max || self.pending_bytes > self.pending_bytes_max {
            self.collapse();
        }
        self.publish();
    }

    /// The ops waiting, in order (the anti-entropy check asks which paths
    /// have a change on its way).
    pub fn pending_ops(&self) -> impl Iterator<Item = &Op> {
        self.queue.iter().flatten()
    }

    /// A rename is queued (or was, and has been merged away since).
    pub(crate) fn rename_queued(&self) -> bool {
        self.last_rename_seq.is_some_and(|s| s >= self.head_seq)
    }

    /// A rescan of some store is queued (a comparison will follow it).
    pub(crate) fn rescan_pending(&self) -> bool {
        !self.rescans.is_empty()
    }

    /// Ops waiting.
    pub fn pending(&self) -> usize {
        self.live
    }

    /// Notified after every op a producer queues (or drops for a rescan):
    /// a consumer can sleep on it instead of polling.
    pub fn waker(&self) -> Arc<tokio::sync::Notify> {
        self.shared.wake.clone()
    }

    /// Every change made before the instant returned has been read by the
    /// tracker and is in this queue once it is drained
    /// ([`super::Shared::read_upto`]); none yet: `None`.
    pub(crate) fn read_upto(&self) -> Option<Instant> {
        self.shared.read_upto()
    }

    /// Whether `rel` of `store`, or a folder above it, is one the tracker
    /// cannot watch: a rename there has no event.
    pub(crate) fn unwatched_at_or_above(&self, store: usize, rel: &std::path::Path) -> bool {
        self.shared.unwatched_at_or_above(store, rel)
    }

    /// The tracker could not watch folder `rel` (`true`), or watches it
    /// again (for a tracker model driving the coalescer).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn note_unwatched(&self, store: usize, rel: &std::path::Path, unwatched: bool) {
        self.shared.note_unwatched(store, rel, unwatched);
    }

    /// Every folder is watched again (for a tracker model).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn clear_unwatched(&self) {
        self.shared.clear_unwatched();
    }

    /// Asks the tracker for a fresh [`Coalescer::read_upto`] now; the
    /// waker is notified when it advances.
    pub(crate) fn ask_read_upto(&self) {
        self.shared.ask_read_upto();
    }

    /// Every change made before the instant returned has its op in this
    /// queue, or taken from it: the tracker had read past it when a drain
    /// that emptied the channel began.
    pub(crate) fn drained_upto(&self) -> Option<Instant> {
        self.drained_upto
    }

    /// A simulator's tracker model says what it has delivered (into this
    /// queue: drained too).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn set_read_upto(&mut self, at: Instant) {
        self.shared.set_read_upto(at);
        self.drained_upto = Some(at).max(self.drained_upto);
    }

    /// A clone of the producer side, so other threads can also inject ops
    /// (they do not wake the consumer: embedders use [`super::Notifier`]).
    pub fn sender(&self) -> Sender<Op> {
        self.tx.clone()
    }

    fn publish(&self) {
        self.shared
            .pending
            .store(self.live as u64, Ordering::Relaxed);
    }

    fn append(&mut self, op: Op) -> u64 {
        self.pending_bytes += queued_bytes(&op);
        let seq = self.head_seq + self.queue.len() as u64;
        self.queue.push_back(Some(op));
        self.live += 1;
        seq
    }

    fn slot_index(&self, seq: u64) -> Option<usize> {
        usize::try_from(seq.checked_sub(self.head_seq)?).ok()
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Op> {
        let index = self.slot_index(seq)?;
        self.queue.get_mut(index)?.as_mut()
    }

    /// The `since` of the mergeable queued Sync of exactly `rel`.
    fn live_sync_since(&self, store: usize, rel: &Path) -> Option<Instant> {
        let seq = *self.syncs.get(&store)?.get(key(rel))?;
        self.queue
            .get(self.slot_index(seq)?)?
            .as_ref()
            .map(Op::since)
    }

    /// Takes the mergeable queued Sync of exactly `rel` out of the queue.
    fn drop_sync(&mut self, store: usize, rel: &Path) {
        let Some(seq) = self
            .syncs
            .get_mut(&store)
            .and_then(|paths| paths.remove(key(rel)))
        else {
            return;
        };
        if let Some(slot) = self.slot_index(seq).and_then(|i| self.queue.get_mut(i)) {
            if let Some(op) = slot.take() {
                self.live -= 1;
                self.pending_bytes -= queued_bytes(&op);
            }
        }
    }

    fn push_sync(&mut self, store: usize, rel: RelPath, since: Instant) {
        if let Some(&seq) = self
            .syncs
            .get(&store)
            .and_then(|paths| paths.get(key(&rel)))
        {
            // The queued one reads the latest state when sent; it keeps the earlier `since`.
            if let Some(Op::Sync { since: queued, .. }) = self.slot_mut(seq) {
                *queued = (*queued).min(since);
            }
            return;
        }
        let k = key(&rel).to_vec();
        let seq = self.append(Op::Sync { store, rel, since });
        self.syncs.entry(store).or_default().insert(k, seq);
    }

    fn push_rescan(&mut self, store: usize, reason: String, since: Instant) {
        if let Some(&seq) = self.rescans.get(&store) {
            if let Some(Op::Rescan { since: queued, .. }) = self.slot_mut(seq) {
                *queued = (*queued).min(since);
            }
            return;
        }
        let seq = self.append(Op::Rescan {
            store,
            reason,
            since,
        });
        self.rescans.insert(store, seq);
    }

    fn push_rename(&mut self, store: usize, from: RelPath, to: RelPath, since: Instant) {
        if from == to {
            // rename(2) onto itself changes nothing.
            return;
        }
        // The replica has never had the content at `from` if a Sync of it, or of a directory above
        // it, is still queued: renaming there would find nothing. Send `to` in full instead; the
        // queued Sync sends the delete at `from`.
        let unsent = from
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .find_map(|p| self.live_sync_since(store, p));
        if let Some(unsent_since) = unsent {
            let since = since.min(unsent_since);
            if self.move_sync_to_new_name(store, &from, &to, since) {
                // The new name took the old one's place in the queue; the
                // old name (now a delete) goes last.
                self.push_sync(store, from, since);
                return;
            }
            // The new name first: where the replica holds `from` after all
            // (the queued Sync a retry of an op that found no room, say),
            // it keeps the message until the new name has it, rather than
            // seeing its old name deleted first.
            self.drop_sync(store, &from);
            self.push_sync(store, to, since);
            self.push_sync(store, from, since);
            return;
        }

        // Queued Syncs under a renamed directory move with it: they are re-queued after the rename
        // under their new path, so the replica renames first and then receives only what changed.
        let mut moved: Vec<(RelPath, u64)> = self.take_descendants(store, &from);
        moved.sort_unstable_by_key(|(_, seq)| *seq);
        let mut requeue = Vec::with_capacity(moved.len());
        for (old, seq) in moved {
            let Some(slot) = self.slot_index(seq).and_then(|i| self.queue.get_mut(i)) else {
                continue;
            };
            if let Some(Op::Sync { since, .. }) = slot {
                let since = *since;
                if let Some(op) = slot.take() {
                    self.pending_bytes -= queued_bytes(&op);
                }
                self.live -= 1;
                let suffix = old.strip_prefix(&from).unwrap_or(Path::new(""));
                requeue.push((to.join(suffix), since));
            }
        }
        // Fence: Syncs at or under `to` queued before the rename must not absorb changes made
        // after it, or the replica would apply them before the rename.
        drop(self.take_descendants(store, &to));
        if let Some(paths) = self.syncs.get_mut(&store) {
            paths.remove(key(&from));
            paths.remove(key(&to));
        }

        let seq = self.append(Op::Rename {
            store,
            from,
            to,
            since,
        });
        self.last_rename_seq = Some(seq);
        for (rel, since) in requeue {
            self.push_sync(store, rel, since);
        }
    }

    /// A file whose Sync is queued and not yet taken was renamed: its new
    /// name takes the queued Sync's place (or the new name's own queued
    /// Sync, if that one is earlier), so the content goes out no later than
    /// it would have under its old name. Appended at the end instead, a
    /// chain of renames (`new/m` → `cur/m:2,S` → `cur/m:2,SR`) kept moving
    /// the content behind the old name's delete, past a batch's end: a
    /// replica cut off between the two held the message under neither name.
    /// False if no Sync of exactly `from` is queued, or a Rename, or a Sync
    /// of a folder above `to`, was queued after it.
    fn move_sync_to_new_name(
        &mut self,
        store: usize,
        from: &Path,
        to: &Path,
        since: Instant,
    ) -> bool {
        let Some(paths) = self.syncs.get_mut(&store) else {
            return false;
        };
        let Some(&from_seq) = paths.get(key(from)) else {
            return false;
        };
        if self.last_rename_seq.is_some_and(|r| r > from_seq) {
            // A rename queued since may move what the new name is under.
            return false;
        }
        if to
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| paths.get(key(a)).is_some_and(|&seq| seq > from_seq))
        {
            // A folder above the new name queued since (made there after a
            // file of that name, say): the replica gets it first.
            return false;
        }
        paths.remove(key(from));
        let to_seq = paths.get(key(to)).copied();
        let Some(index) = self.slot_index(from_seq) else {
            return false;
        };
        let Some(slot) = self.queue.get_mut(index) else {
            return false;
        };
        let Some(old) = slot.take() else {
            return false;
        };
        self.pending_bytes -= queued_bytes(&old);
        self.live -= 1;
        match to_seq {
            Some(to_seq) if to_seq < from_seq => {
                // The new name is queued earlier still: it keeps its place.
                if let Some(Op::Sync { since: queued, .. }) = self.slot_mut(to_seq) {
                    *queued = (*queued).min(since);
                }
            }
            _ => {
                if to_seq.is_some() {
                    self.drop_sync(store, to);
                }
                let op = Op::Sync {
                    store,
                    rel: to.to_path_buf(),
                    since,
                };
                self.pending_bytes += queued_bytes(&op);
                self.live += 1;
                if let Some(slot) = self.queue.get_mut(index) {
                    *slot = Some(op);
                }
                self.syncs
                    .entry(store)
                    .or_default()
                    .insert(key(to).to_vec(), from_seq);
            }
        }
        true
    }

    /// Removes and returns the mergeable Syncs strictly below `dir`.
    fn take_descendants(&mut self, store: usize, dir: &Path) -> Vec<(RelPath, u64)> {
        let Some(paths) = self.syncs.get_mut(&store) else {
            return Vec::new();
        };
        // Keys order byte-wise: everything below `dir` starts with `dir/`,
        // one range (relative paths are normalised: no `//`, no trailing `/`).
        let found: Vec<Key> = if dir.as_os_str().is_empty() {
            paths.keys().cloned().collect()
        } else {
            let mut lo = key(dir).to_vec();
            lo.push(b'/');
            let mut hi = key(dir).to_vec();
            hi.push(b'/' + 1);
            paths
                .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
                .map(|(k, _)| k.clone())
                .collect()
        };
        found
            .into_iter()
            .filter_map(|k| {
                let seq = paths.remove(&k)?;
                Some((PathBuf::from(OsString::from_vec(k)), seq))
            })
            .collect()
    }

    fn compact_if_sparse(&mut self) {
        let tombstones = self.queue.len() - self.live;
        if tombstones <= self.live.max(COMPACT_TOMBSTONES_MIN) {
            return;
        }
        let mut new_seq = Vec::with_capacity(self.queue.len());
        let mut next = self.head_seq;
        for slot in &self.queue {
            new_seq.push(next);
            if slot.is_some() {
                next += 1;
            }
        }
        let head = self.head_seq;
        let remap = |seq: &mut u64| *seq = new_seq[(*seq - head) as usize];
        self.syncs
            .values_mut()
            .flat_map(|m| m.values_mut())
            .for_each(remap);
        self.rescans.values_mut().for_each(remap);
        if let Some(seq) = self.last_rename_seq.as_mut() {
            // One already taken stays below every queued op.
            if *seq >= head {
                remap(seq);
            }
        }
        self.queue.retain(Option::is_some);
    }

    /// Replaces the whole list with one Rescan per store it held.
    fn collapse(&mut self) {
        let mut stores: BTreeMap<usize, Instant> = BTreeMap::new();
        for op in self.queue.iter().flatten() {
            let since = stores.entry(op.store()).or_insert(op.since());
            *since = (*since).min(op.since());
        }
        let dropped = self.live;
        let bytes = self.pending_bytes;
        self.head_seq += self.queue.len() as u64;
        self.queue.clear();
        self.live = 0;
        self.pending_bytes = 0;
        self.syncs.clear();
        self.rescans.clear();
        self.last_rename_seq = None;
        tracing::warn!(
            dropped,
            bytes,
            ops_max = self.pending_ops_max,
            bytes_max = self.pending_bytes_max,
            stores = stores.len(),
            "too many pending changes; collapsing them into a rescan per store"
        );
        for (store, since) in stores {
            let reason = format!(
                "more than {} changes or {} MiB of them pending; collapsed into a rescan",
                self.pending_ops_max,
                self.pending_bytes_max >> 20
            );
            self.push_rescan(store, reason, since);
            Shared::add(&self.shared.rescans, 1);
        }
    }

    /// Producers dropped ops at the channel bound: a rescan covers whatever they dropped.
    fn recover_lost(&mut self) {
        if !self.shared.any_lost.swap(false, Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        for store in 0..self.shared.lost.len() {
            if self.shared.lost[store].swap(false, Ordering::SeqCst) {
                Shared::add(&self.shared.rescans, 1);
                self.push(Op::Rescan {
                    store,
                    reason: format!(
                        "change channel exceeded {} ops or {} MiB; changes were dropped",
                        self.shared.channel_ops_max,
                        self.shared.channel_bytes_max >> 20
                    ),
                    since: now,
                });
            }
        }
    }
}
