//! The comparison with the replica that starts every session (and every
//! verification): the local scans and the replica's manifest, both in path
//! order, walked side by side as the manifest's chunks arrive. Neither side
//! is held whole a second time: a million-file store is compared with one
//! chunk of the manifest in memory, not a map of all of it.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::super::drift::{Difference, InFlight};
use super::super::index::{Entry, Kind, Rehash, ScanEntry, Stat};
use super::super::links::InodeKey;
use super::super::tree::LocalTree;
use super::super::walk::{Ordered, Walk};
use super::vanished::{stamp, DirStamp, GoneAtWalk};
use super::{add, rel_bytes, Sender, SyncPhase, PRESCAN_FRESH};
use crate::model::path_order;
use crate::wire::sync::{EntryKind, ManifestEntry, SyncMsg};

/// A comparison under way (see the module's text).
pub(crate) struct Comparison {
    on_way: InFlight,
    stores: Vec<StoreComparison>,
    found: Found,
    /// Folders only the replica holds (see [`super::vanished`]).
    gone: GoneAtWalk,
}

/// What a [`Comparison`] found so far, over all stores.
struct Found {
    initial: bool,
    /// Differing paths with the ctime that may explain them (not for the
    /// first comparison of a session: everything differs then).
    differing: Vec<Difference>,
    differ: u64,
    files: u64,
    bytes: u64,
    /// A former primary's genuine conflicts, to keep aside there.
    aside: Vec<(usize, PathBuf)>,
}

/// One store's side of a [`Comparison`].
struct StoreComparison {
    /// The local entries not yet compared, in path order: walked as the
    /// manifest's chunks arrive (or a recent scan held whole).
    local: Ordered,
    /// The replica's last entry, to hold it to path order.
    last_remote: Option<Vec<u8>>,
    /// The versions this node held at takeover (or sent since) when the
    /// peer is a former primary: any other version of its is genuine.
    /// Taken at the store's first chunk: the peer says whether it is a
    /// former primary (`PeerState`) before its manifest, while the
    /// comparison already waits for it.
    takeover: Option<HashSet<u128>>,
    started: bool,
    /// Dovecot's own files follow this node (see `genuine`).
    dovecot: bool,
    /// Folder ctimes looked up for differing paths (a folder renamed or
    /// changed while the comparison ran explains its contents).
    dir_changes: HashMap<PathBuf, Option<(i64, u32)>>,
    /// Non-folders found different: not held as recorded.
    not_held: HashSet<PathBuf>,
    /// Paths to send or delete: the local ones in path order, then those
    /// only the replica has.
    queue: super::backlog::Backlog,
    /// Entries only the replica has, queued once the local ones are (a
    /// difference each: few, but for a replica that holds a tree the
    /// primary lost).
    remote_only: Vec<(PathBuf, EntryKind, u128)>,
    /// The root's stamp, taken before the walk listed it (not for a scan
    /// taken earlier).
    root: Option<DirStamp>,
    /// The last folder only the replica holds that topped its subtree.
    last_gone_top: Option<PathBuf>,
    /// Files found the same that have other names here or there: their inode here,
    /// their link identity on the replica and their version (see
    /// [`Sender::split_links`]); at most [`LINKED_NAMES_MAX`].
    linked: Vec<LinkedName>,
    /// Such names past [`LINKED_NAMES_MAX`], not checked.
    linked_over: u64,
    done: bool,
}

impl StoreComparison {
    /// A version of the former primary's this node never held: a genuine
    /// conflict, kept aside there. Dovecot's own files (uidlist, indexes)
    /// describe the mail the node holds; the old primary's never are mail.
    fn genuine(&self, rel: &Path, kind: EntryKind, hash: u128) -> bool {
        self.takeover
            .as_ref()
            .is_some_and(|t| kind == EntryKind::File && !t.contains(&hash))
            && !(self.dovecot && super::super::dovecot::is_dovecot_metadata(rel))
    }
}

/// Why the replica's manifest cannot be compared (a protocol error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ManifestError {
    #[error("manifest for store {store}, which does not exist")]
    NoSuchStore { store: usize },
    #[error("manifest for store {store} after its last chunk")]
    AfterLast { store: usize },
    #[error("manifest for store {store} out of path order at {path:?}")]
    OutOfOrder { store: usize, path: String },
}

/// Why a chunk of the manifest could not be compared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CompareError {
    /// The peer's fault (a protocol error).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The local store could not be walked.
    #[error("walking {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Comparison {
    /// Has every store's manifest arrived?
    pub(crate) fn complete(&self) -> bool {
        self.stores.iter().all(|s| s.done)
    }
}

impl<T: LocalTree> Sender<T> {
    /// Starts a comparison with the replica: what is on its way (it
    /// explains a difference; only the rest is drift), and the manifest
    /// request to send.
    pub(crate) fn begin_comparison(
        &mut self,
        full_verify: bool,
        initial: bool,
    ) -> (InFlight, Vec<u8>) {
        self.set_phase(if initial {
            SyncPhase::Manifest
        } else {
            SyncPhase::Verifying
        });
        self.comparison_owed = false;
        self.compared_at = Some(Instant::now());
        // Its walk begins after every folder found gone so far.
        self.vanished = None;
        self.gone_at_walk = None;
        self.folder_moved = false;
        // Its listings stand for its backlog, which replaces the last one's.
        self.listed_dirs.clear();
        let mut on_way = InFlight::new(std::time::SystemTime::now());
        for (s, rel) in self.backlog.iter() {
            on_way.add_path(s, &rel);
        }
        // This comparison finds everything still different, and names
        // still joined on the replica.
        self.backlog.clear();
        self.unjoin.clear();
        self.manifest_id += 1;
        let id = self.manifest_id;
        let mut out = Vec::new();
        SyncMsg::ManifestRequest { id, full_verify }.encode(&mut out);
        (on_way, out)
    }

    /// Every store's entries, in path order, for a comparison: a scan
    /// taken as the tenure began (if recent, and small enough to have been
    /// kept), else a walk that lists each folder as the comparison reaches
    /// it.
    pub(crate) fn local_entries(&mut self, full_verify: bool) -> Vec<Ordered> {
        let mut pre = match self.prescanned.take() {
            Some((at, v)) if !full_verify && at.elapsed() < PRESCAN_FRESH => v,
            _ => Vec::new(),
        };
        let rehash = if full_verify {
            Rehash::All
        } else {
            Rehash::Changed
        };
        self.stores
            .iter_mut()
            .enumerate()
            .map(|(i, store)| match pre.get_mut(i).and_then(Option::take) {
                Some(scan) => Ordered::held(scan),
                None => Ordered::walk(Walk::new(&mut store.index, rehash, false)),
            })
            .collect()
    }

    /// Starts comparing the local entries (one source per store, in path
    /// order) with the replica's manifest, which [`Sender::compare_chunk`]
    /// then feeds.
    pub(crate) fn start_compare(
        &mut self,
        on_way: InFlight,
        locals: Vec<Ordered>,
        initial: bool,
    ) -> Comparison {
        let stores = locals
            .into_iter()
            .enumerate()
            .map(|(s, local)| StoreComparison {
                root: local
                    .walk_not_begun()
                    .then(|| self.stores[s].tree.lstat(Path::new("")).ok().flatten())
                    .flatten()
                    .filter(|st| st.kind == Kind::Dir)
                    .map(|st| stamp(&st)),
                last_gone_top: None,
                local,
                last_remote: None,
                takeover: None,
                started: false,
                dovecot: self.stores[s].dovecot,
                dir_changes: HashMap::new(),
                not_held: HashSet::new(),
                queue: super::backlog::Backlog::new(),
                remote_only: Vec::new(),
                linked: Vec::new(),
                linked_over: 0,
                done: false,
            })
            .collect();
        Comparison {
            on_way,
            stores,
            found: Found {
                initial,
                differing: Vec::new(),
                differ: 0,
                files: 0,
                bytes: 0,
                aside: Vec::new(),
            },
            gone: GoneAtWalk::new(),
        }
    }

    /// Store `s`'s next local entry, if `pred` holds for it.
    fn next_local(
        &mut self,
        sc: &mut StoreComparison,
        s: usize,
        pred: impl FnOnce(&ScanEntry) -> bool,
    ) -> Result<Option<ScanEntry>, CompareError> {
        let store = &mut self.stores[s];
        sc.local
            .next_if(&store.tree, &mut store.index, &self.excludes, pred)
            .map_err(|source| CompareError::Local {
                path: store.root.clone(),
                source,
            })
    }

    /// Compares one chunk of store `s`'s manifest (entries in path order)
    /// with the local entries up to it; `last` ends the store.
    pub(crate) fn compare_chunk(
        &mut self,
        cmp: &mut Comparison,
        s: usize,
        entries: Vec<ManifestEntry>,
        last: bool,
    ) -> Result<(), CompareError> {
        let Some(sc) = cmp.stores.get_mut(s) else {
            return Err(ManifestError::NoSuchStore { store: s }.into());
        };
        let found = &mut cmp.found;
        if sc.done {
            return Err(ManifestError::AfterLast { store: s }.into());
        }
        if !sc.started {
            sc.started = true;
            // A former primary's versions are decided exactly: what this
            // node held when it took over was superseded by its users;
            // anything else is a genuine conflict, kept aside there.
            if self.peer_former_primary {
                sc.takeover = self.known.get(s).cloned().flatten();
            }
        }
        for r in entries {
            // The peer only names paths it was sent; a name that is not a
            // valid relative path is not compared (nor deleted).
            if super::super::fsops::check_rel(&r.path).is_err() {
                continue;
            }
            let rel = Path::new(std::ffi::OsStr::from_bytes(&r.path));
            if let Some(prev) = &sc.last_remote {
                let prev = Path::new(std::ffi::OsStr::from_bytes(prev));
                if path_order(prev, rel) != std::cmp::Ordering::Less {
                    return Err(ManifestError::OutOfOrder {
                        store: s,
                        path: String::from_utf8_lossy(&r.path).into_owned(),
                    }
                    .into());
                }
            }
            // Local entries before this one: the replica does not have them.
            while let Some(l) = self.next_local(sc, s, |l| path_order(&l.0, rel).is_lt())? {
                self.compare_local(found, sc, s, l, None);
            }
            match self.next_local(sc, s, |l| l.0.as_path() == rel)? {
                Some(l) => self.compare_local(found, sc, s, l, Some(&r)),
                // Dealt with after the local entries (the order the
                // backlog has always had).
                None => sc.remote_only.push((rel.to_path_buf(), r.kind, r.hash)),
            }
            sc.last_remote = Some(r.path);
        }
        if last {
            while let Some(l) = self.next_local(sc, s, |_| true)? {
                self.compare_local(found, sc, s, l, None);
            }
            for rel in sc.local.take_too_long() {
                self.out_of_reach
                    .report(&self.stats, &self.stores[s].name, &rel);
            }
            // A folder renamed away while the walk was on its way to it:
            // its rename moves on the replica what the replica holds there,
            // which this comparison did not check (a message the replica
            // lacks stays missing under the new name). Compare again.
            if sc.local.vanished() > 0 {
                tracing::debug!(
                    store = %self.stores[s].name,
                    folders = sc.local.vanished(),
                    "folders vanished while the comparison walked: comparing again"
                );
                self.pending_verify = true;
            }
            for r in std::mem::take(&mut sc.remote_only) {
                if r.1 == EntryKind::Dir {
                    let parent = r.0.parent().unwrap_or(Path::new(""));
                    let seen = if parent.as_os_str().is_empty() {
                        sc.root
                    } else {
                        self.listed_dirs.get(&(s, parent.to_path_buf())).copied()
                    };
                    cmp.gone.record(&mut sc.last_gone_top, s, &r.0, seen);
                }
                self.remote_only(found, sc, s, r);
            }
            self.finish_store(found, sc, s);
        }
        Ok(())
    }

    /// A local entry, with the replica's entry of the same name if it has one.
    fn compare_local(
        &mut self,
        found: &mut Found,
        sc: &mut StoreComparison,
        s: usize,
        (rel, st, hash): ScanEntry,
        theirs: Option<&ManifestEntry>,
    ) {
        let store = &mut self.stores[s];
        let same = match theirs {
            // A folder whose entries are excluded (Maildir tmp/) changes
            // its mtime with what is not replicated.
            Some(r)
                if st.kind == Kind::Dir
                    && self.excludes.is_excluded(&rel.join("x"))
                    && same_entry_but_mtime(&st, r) =>
            {
                true
            }
            // Hash only what could be equal: same kind, size, mtime, owner.
            Some(r) if same_entry(&st, r.hash, r) => {
                let hash = match hash {
                    Some(h) => Some(h),
                    None => store.tree.hash(&rel, st.kind).ok().inspect(|h| {
                        store.index.set(rel.clone(), Entry::new(&st, *h, false));
                    }),
                };
                hash == Some(r.hash)
            }
            _ => false,
        };
        if !same && theirs.is_some_and(|r| sc.genuine(&rel, r.kind, r.hash)) {
            found.aside.push((s, rel.clone()));
        }
        if st.kind == Kind::Dir {
            let v = st.version;
            self.listed_dirs
                .insert((s, rel.clone()), (v.ino, v.ctime_s, v.ctime_ns));
        }
        store.index.set_synced(&rel, same);
        if same {
            let remote = theirs.map_or(0, |r| r.link);
            if st.kind == Kind::File && (st.nlink > 1 || remote != 0) {
                let key = (st.dev, st.version.ino);
                if st.nlink > 1 {
                    self.inodes.record(key, s, &rel, st.version);
                }
                if sc.linked.len() < LINKED_NAMES_MAX {
                    sc.linked.push(LinkedName {
                        rel,
                        key,
                        remote,
                        version: st.version,
                        unjoin: false,
                    });
                } else {
                    sc.linked_over += 1;
                }
            }
            return;
        }
        // Whatever a record says the replica holds under this name (a name
        // recorded as its op went out, in a batch a cut lost since, say) it
        // does not: no link to it. (Collected only when there is a record
        // to forget from: the first comparison of a big tree differs
        // everywhere.)
        if st.kind != Kind::Dir && !self.inodes.is_empty() {
            sc.not_held.insert(rel.clone());
        }
        if st.kind == Kind::File {
            found.files += 1;
            found.bytes += st.version.size;
        }
        if !found.initial {
            let v = st.version;
            let own = Some((v.ctime_s, v.ctime_ns));
            let above = newest_change_above(&store.tree, &rel, &mut sc.dir_changes);
            found.differing.push((s, rel.clone(), own.max(above)));
        }
        sc.queue.push(s, &rel);
    }

    /// An entry only the replica has: the sender finds it missing and
    /// deletes it there.
    fn remote_only(
        &mut self,
        found: &mut Found,
        sc: &mut StoreComparison,
        s: usize,
        (rel, kind, hash): (PathBuf, EntryKind, u128),
    ) {
        if sc.genuine(&rel, kind, hash) {
            found.aside.push((s, rel.clone()));
        }
        if !found.initial {
            // A delete or a rename away changed the nearest folder that is
            // still here.
            let changed = newest_change_above(&self.stores[s].tree, &rel, &mut sc.dir_changes);
            found.differing.push((s, rel.clone(), changed));
        }
        sc.queue.push(s, &rel);
    }

    /// The store's manifest has all arrived: its differences join the backlog.
    fn finish_store(&mut self, found: &mut Found, sc: &mut StoreComparison, s: usize) {
        sc.done = true;
        self.stores[s].index.mark_dirty();
        // `recent` is empty here (a session starts with it cleared).
        self.inodes
            .forget_names(s, &std::mem::take(&mut sc.not_held));
        self.split_links(sc, s);
        sc.dir_changes = HashMap::new();
        let mut queue = std::mem::take(&mut sc.queue);
        found.differ += queue.len() as u64;
        self.backlog_since = Instant::now();
        self.backlog.append(&mut queue);
    }

    /// Ends a comparison whose manifests have all arrived: returns how many
    /// paths differed and the frames that keep a former primary's genuine
    /// conflicts aside (sent before anything else).
    pub(crate) fn finish_compare(&mut self, cmp: Comparison) -> (u64, Vec<u8>) {
        debug_assert!(cmp.complete(), "a comparison finished before its manifests");
        let Comparison {
            mut on_way,
            found,
            gone,
            ..
        } = cmp;
        self.gone_at_walk = Some(gone.ended(Instant::now()));
        let Found {
            initial,
            differing,
            differ,
            files,
            bytes,
            aside,
        } = found;
        let mut out = Vec::new();
        if !aside.is_empty() {
            // Before any op that would replace or delete them.
            for (s, rel) in &aside {
                let seq = self.next_seq();
                SyncMsg::KeepAside {
                    seq,
                    store: *s as u16,
                    path: rel_bytes(rel),
                }
                .encode(&mut out);
            }
            warn!(
                versions = aside.len(),
                "the former primary holds {} versions this node never had (its replication lag window): they are kept aside and handed over here as conflicts",
                aside.len()
            );
        }
        self.stats.verify_runs.fetch_add(1, Relaxed);
        if !differing.is_empty() {
            // Changes made while the comparison ran, queued since.
            self.coalescer.drain();
            for op in self
                .coalescer
                .pending_ops()
                .chain(self.retry.iter().map(|(_, op)| op))
                .chain(self.gate.held())
            {
                on_way.add_op(op);
            }
            let refused = &self.refused;
            let drift: Vec<&Difference> = differing
                .iter()
                .filter(|(s, rel, changed)| {
                    !on_way.explains(*s, rel, *changed) && !refused.contains(&(*s, rel.clone()))
                })
                .collect();
            let in_transit = differing.len() - drift.len();
            debug!(
                in_transit,
                "anti-entropy: {in_transit} differences are changes on their way"
            );
            if let Some((s, rel, _)) = drift.first() {
                let n = drift.len() as u64;
                add(&self.stats.repaired, n);
                let line = format!(
                    "anti-entropy found {n} paths on the replica that differ with no change pending here (drift: the replica was changed outside hasync, or a change was missed); repairing. First: {}",
                    self.stores[*s].tree.abs(rel).display()
                );
                warn!(alarm = true, paths = n, "ALARM: {line}");
                self.stats.raise_alarm(line);
            }
        }
        {
            let mut p = self.stats.progress.lock().expect("progress lock");
            p.phase = if initial {
                SyncPhase::InitialSync
            } else {
                SyncPhase::Verifying
            };
            p.total_files = files;
            p.total_bytes = bytes;
            p.done_files = 0;
            p.done_bytes = 0;
            p.started = Some(Instant::now());
        }
        info!(
            differ,
            files,
            bytes,
            "{}: {differ} paths to send ({files} files, {:.1} MB)",
            if initial {
                "initial sync"
            } else {
                "verification"
            },
            bytes as f64 / 1e6
        );
        (differ, out)
    }

    /// Hard-link groups the replica holds otherwise than here. Not drift
    /// (nothing is lost or wrong: same names, same content), so not
    /// counted as a repair; logged.
    ///
    /// First, names the replica holds as one inode that are apart here
    /// (joined there after a refused rename became a sync of both names,
    /// say): of each inode there, the names of the file here that has the
    /// most of them stay; the others are sent again: as a file `apart`
    /// (landing in an inode of its own, see [`Sender::file_apart`]), or as
    /// a link where their file here has a name the replica holds apart
    /// from that inode.
    ///
    /// Then names of one inode here that the replica holds the same but
    /// not as one inode (a group split there: after a refused folder
    /// rename, say, a name sent as bytes): each name apart from the
    /// group's largest part there is sent again, as a link to a name of
    /// that part. The files sent apart go first, so that the links to
    /// them follow their landing.
    fn split_links(&mut self, sc: &mut StoreComparison, s: usize) {
        let mut linked = std::mem::take(&mut sc.linked);
        if sc.linked_over > 0 {
            info!(
                store = %self.stores[s].name,
                names = sc.linked_over,
                "{} names with other names here or there were past the {LINKED_NAMES_MAX} whose links this comparison checks on the replica",
                sc.linked_over
            );
        }
        // Only with every such name seen: a part of a group would take
        // apart names the rest shows to belong together.
        let unjoined = if sc.linked_over == 0 {
            unjoin(&mut linked)
        } else {
            0
        };
        // A group's names together, in path order within it.
        linked.sort_unstable_by(|a, b| a.key.cmp(&b.key).then_with(|| path_order(&a.rel, &b.rel)));
        let mut links = Vec::new();
        for group in linked.chunk_by(|a, b| a.key == b.key) {
            if group.len() < 2 {
                continue;
            }
            let anchor = link_anchor(group);
            let (mut stayer, mut apart) = (None, false);
            for (i, n) in group.iter().enumerate() {
                // No part of the group linked there: the first name stays,
                // the others link to it.
                if (anchor == 0 && i == 0) || (anchor != 0 && n.remote == anchor) {
                    stayer.get_or_insert(n);
                    continue;
                }
                apart = true;
                links.push(n);
            }
            // The name the others link to, whatever the record dropped of
            // a group of many names.
            if let Some(n) = stayer.filter(|_| apart) {
                self.inodes.record(n.key, s, &n.rel, n.version);
            }
        }
        // Sent as files: the names taken apart that no name here links to
        // another name (a name sent as a link needs no `apart`).
        let linking: HashSet<&Path> = links.iter().map(|n| n.rel.as_path()).collect();
        let files: Vec<&LinkedName> = linked
            .iter()
            .filter(|n| n.unjoin && !linking.contains(n.rel.as_path()))
            .collect();
        for n in files.iter().chain(&links) {
            self.stores[s].index.set_synced(&n.rel, false);
            self.inodes.forget_name(n.key, s, &n.rel);
            sc.queue.push(s, &n.rel);
        }
        for n in &files {
            self.unjoin.insert((s, n.rel.clone()));
        }
        if unjoined > 0 {
            info!(
                store = %self.stores[s].name,
                names = unjoined,
                "{unjoined} names held as one file on the replica are apart here: sent again, each to a file of its own (first: {})",
                files.first().map_or(Path::new("").display(), |n| n.rel.display())
            );
        }
        if let Some(n) = links.first() {
            info!(
                store = %self.stores[s].name,
                names = links.len(),
                "{} names of hard-link groups held apart on the replica are sent again as links (first: {})",
                links.len(),
                n.rel.display()
            );
        }
    }
}

/// Marks the names the replica holds as one inode (one link identity
/// there) that are apart here: of each such inode there, the names of the
/// file here that has the most of them stay (ties: the smallest inode
/// here); the others are marked `unjoin` and count as not linked there.
/// Returns how many were marked.
fn unjoin(linked: &mut [LinkedName]) -> usize {
    linked.sort_unstable_by_key(|n| (n.remote, n.key));
    let mut marked = 0;
    for group in linked.chunk_by_mut(|a, b| a.remote == b.remote) {
        if group[0].remote == 0 || group.iter().all(|n| n.key == group[0].key) {
            continue;
        }
        // Sorted by key within the group: the longest run stays.
        let mut stays = (group[0].key, 0usize);
        for run in group.chunk_by(|a, b| a.key == b.key) {
            if run.len() > stays.1 {
                stays = (run[0].key, run.len());
            }
        }
        for n in group.iter_mut().filter(|n| n.key != stays.0) {
            n.unjoin = true;
            n.remote = 0;
            marked += 1;
        }
    }
    marked
}

/// A name found the same whose file has other names here or on the replica.
struct LinkedName {
    rel: PathBuf,
    key: InodeKey,
    /// Its link identity on the replica (0: no other name there, or
    /// taken apart there: `unjoin`).
    remote: u64,
    version: super::super::index::Version,
    /// Held there as one file with names apart here: sent again, apart
    /// or as a link.
    unjoin: bool,
}

/// Names with other names here or on the replica whose links one store's
/// comparison checks (about 100 bytes each, held until the store's
/// manifest has all arrived); past it, the store's other names are not
/// checked (logged), and no names joined on the replica are taken apart
/// in that store.
pub(crate) const LINKED_NAMES_MAX: usize = 1 << 18;

/// The replica's link identity most names of a group share (ties: the
/// smallest, the same choice every time); when none is shared, 0 and the
/// first name in path order keeps its inode: the names are sent again, all
/// but that one (which the caller leaves as it is).
fn link_anchor(names: &[LinkedName]) -> u64 {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for n in names {
        if n.remote != 0 {
            *counts.entry(n.remote).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(link, _)| link)
}

/// The newest ctime among the folders above `rel` that exist here (a
/// folder renamed, or an entry added or removed in it, moves its ctime;
/// a folder renamed does not move its entries' ctimes).
fn newest_change_above(
    tree: &impl LocalTree,
    rel: &Path,
    seen: &mut HashMap<PathBuf, Option<(i64, u32)>>,
) -> Option<(i64, u32)> {
    let mut newest = None;
    for dir in rel.ancestors().skip(1) {
        let c = *seen.entry(dir.to_path_buf()).or_insert_with(|| {
            tree.lstat(dir)
                .ok()
                .flatten()
                .map(|st| (st.version.ctime_s, st.version.ctime_ns))
        });
        newest = newest.max(c);
    }
    newest
}

/// A folder with the same mode and owner (its mtime aside).
fn same_entry_but_mtime(st: &Stat, r: &ManifestEntry) -> bool {
    r.kind == EntryKind::Dir
        && st.meta.mode == r.meta.mode
        && st.meta.uid == r.meta.uid
        && st.meta.gid == r.meta.gid
}

/// Does the replica's entry match the local one?
fn same_entry(st: &Stat, hash: u128, r: &ManifestEntry) -> bool {
    let kind_ok = matches!(
        (st.kind, r.kind),
        (Kind::File, EntryKind::File)
            | (Kind::Dir, EntryKind::Dir)
            | (Kind::Symlink, EntryKind::Symlink)
    );
    if !kind_ok {
        return false;
    }
    let owner_mode =
        st.meta.mode == r.meta.mode && st.meta.uid == r.meta.uid && st.meta.gid == r.meta.gid;
    match st.kind {
        // A folder's mtime follows each batch that changes its entries.
        Kind::Dir => {
            owner_mode
                && st.meta.mtime_sec == r.meta.mtime_sec
                && st.meta.mtime_nsec == r.meta.mtime_nsec
        }
        Kind::Symlink => hash == r.hash && st.meta.uid == r.meta.uid,
        Kind::File => {
            owner_mode
                && hash == r.hash
                && st.version.size == r.size
                && st.meta.mtime_sec == r.meta.mtime_sec
                && st.meta.mtime_nsec == r.meta.mtime_nsec
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Meta;
    use crate::replica::index::Index;
    use crate::replica::sender::Store;
    use crate::replica::stats::ReplStats;
    use crate::replica::tree::Tree;
    use crate::tracker::Coalescer;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::time::Duration;

    /// A sender over a real store holding `files` (name, content).
    fn sender_over(dir: &Path, files: &[(&str, &[u8])]) -> Sender<Tree> {
        for (name, body) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let store = Store {
            name: "mail".into(),
            root: dir.to_path_buf(),
            tree: Tree::open(dir).unwrap(),
            index: Index::in_memory(),
            internal: dir.join(".hasync"),
            conflicts: false,
            dovecot: false,
        };
        Sender::new(
            vec![store],
            crate::model::Excludes::new(&[]).unwrap(),
            Coalescer::detached(1),
            Arc::new(ReplStats::default()),
            Duration::from_secs(600),
        )
    }

    fn remote(path: &str, kind: EntryKind, hash: u128) -> ManifestEntry {
        ManifestEntry {
            path: path.as_bytes().to_vec(),
            kind,
            size: 1,
            meta: Meta {
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
            },
            hash,
            link: 0,
        }
    }

    /// Compares the store with `manifest` fed `chunk` entries at a time;
    /// returns the paths queued, sorted.
    fn queued(dir: &Path, manifest: &[ManifestEntry], chunk: usize) -> Vec<String> {
        let mut out = in_queue(&compared(dir, manifest, chunk));
        out.sort();
        out
    }

    /// The backlog, in the order it is sent.
    fn in_queue(s: &Sender<Tree>) -> Vec<String> {
        s.backlog
            .iter()
            .map(|(_, p)| p.to_string_lossy().into_owned())
            .collect()
    }

    /// A sender over `dir` after a comparison with `manifest`.
    fn compared(dir: &Path, manifest: &[ManifestEntry], chunk: usize) -> Sender<Tree> {
        let mut s = sender_over(dir, &[]);
        let (on_way, _) = s.begin_comparison(false, true);
        let locals = s.local_entries(false);
        let mut cmp = s.start_compare(on_way, locals, true);
        let chunks: Vec<_> = manifest.chunks(chunk.max(1)).collect();
        if chunks.is_empty() {
            s.compare_chunk(&mut cmp, 0, Vec::new(), true).unwrap();
        }
        for (i, c) in chunks.iter().enumerate() {
            s.compare_chunk(&mut cmp, 0, c.to_vec(), i + 1 == chunks.len())
                .unwrap();
        }
        assert!(cmp.complete());
        let (differ, _) = s.finish_compare(cmp);
        assert_eq!(differ as usize, s.backlog.len());
        s
    }

    #[test]
    fn both_sides_walked_in_path_order_whatever_the_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sender_over(
            dir.path(),
            &[("a/cur/1", b"x"), ("a/new/2", b"y"), ("b/cur/3", b"z")],
        );
        // The replica holds what the store holds, exactly, but "a/new/2"
        // (missing there) and "a/cur/1" (other content), and two names
        // only it has: one between local entries, one after them all.
        let store = &mut s.stores[0];
        let scan = store
            .index
            .scan(&store.tree, &s.excludes, Rehash::Changed, false)
            .unwrap();
        let mut manifest = Vec::new();
        for (rel, st, hash) in scan.entries.iter() {
            let hash = hash.unwrap_or_else(|| s.stores[0].tree.hash(&rel, st.kind).unwrap());
            let mut e = crate::replica::index::manifest_entry(&rel, &st, hash);
            match rel.to_str().unwrap() {
                "a/new/2" => continue,
                "a/cur/1" => e.hash ^= 1,
                _ => {}
            }
            manifest.push(e);
        }
        manifest.insert(2, remote("a/cur/0", EntryKind::File, 7));
        manifest.push(remote("c", EntryKind::File, 9));
        let want = ["a/cur/0", "a/cur/1", "a/new/2", "c"];
        for chunk in [1, 2, 3, 4096] {
            assert_eq!(
                queued(dir.path(), &manifest, chunk),
                want,
                "chunks of {chunk}"
            );
        }
        // An empty replica: every local entry.
        assert_eq!(queued(dir.path(), &[], 1).len(), scan.entries.len());
    }

    /// Names of one inode here that the replica holds as other inodes are
    /// queued (to go as links), all but the group's largest part there;
    /// a group held whole there, or a name alone here, is not.
    #[test]
    fn names_of_a_hard_link_group_held_apart_on_the_replica_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sender_over(
            dir.path(),
            &[("a/cur/1", b"x"), ("d/cur/2", b"y"), ("f", b"z")],
        );
        for (from, to) in [
            ("a/cur/1", "b/cur/1"),
            ("a/cur/1", "c/cur/1"),
            ("d/cur/2", "e/cur/2"),
        ] {
            let to = dir.path().join(to);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::hard_link(dir.path().join(from), to).unwrap();
        }
        let store = &mut s.stores[0];
        let scan = store
            .index
            .scan(&store.tree, &s.excludes, Rehash::Changed, false)
            .unwrap();
        let exact: Vec<ManifestEntry> = scan
            .entries
            .iter()
            .map(|(rel, st, hash)| {
                let hash = hash.unwrap_or_else(|| s.stores[0].tree.hash(&rel, st.kind).unwrap());
                crate::replica::index::manifest_entry(&rel, &st, hash)
            })
            .collect();
        // The replica's identities: its own inode numbers, not these.
        let with = |links: &[(&str, u64)]| -> Vec<ManifestEntry> {
            exact
                .iter()
                .cloned()
                .map(|mut e| {
                    let p = String::from_utf8(e.path.clone()).unwrap();
                    e.link = links.iter().find(|(n, _)| *n == p).map_or(0, |l| l.1);
                    e
                })
                .collect()
        };
        let whole = with(&[
            ("a/cur/1", 100),
            ("b/cur/1", 100),
            ("c/cur/1", 100),
            ("d/cur/2", 7),
            ("e/cur/2", 7),
        ]);
        // c/cur/1 apart from its group's two others there; d/cur/2 and
        // e/cur/2 two copies there (the first in path order stays).
        let apart = with(&[("a/cur/1", 100), ("b/cur/1", 100), ("c/cur/1", 200)]);
        for chunk in [1, 4096] {
            assert!(
                queued(dir.path(), &whole, chunk).is_empty(),
                "chunks of {chunk}"
            );
            assert_eq!(
                queued(dir.path(), &apart, chunk),
                ["c/cur/1", "e/cur/2"],
                "chunks of {chunk}"
            );
        }
    }

    /// The manifest of the files under `dir` as the replica would list
    /// them with the link identities `links` (the others: no other name).
    fn manifest_with(s: &mut Sender<Tree>, links: &[(&str, u64)]) -> Vec<ManifestEntry> {
        let store = &mut s.stores[0];
        let scan = store
            .index
            .scan(&store.tree, &s.excludes, Rehash::Changed, false)
            .unwrap();
        scan.entries
            .iter()
            .map(|(rel, st, hash)| {
                let hash = hash.unwrap_or_else(|| s.stores[0].tree.hash(&rel, st.kind).unwrap());
                let mut e = crate::replica::index::manifest_entry(&rel, &st, hash);
                let p = String::from_utf8(e.path.clone()).unwrap();
                e.link = links.iter().find(|(n, _)| *n == p).map_or(0, |l| l.1);
                e
            })
            .collect()
    }

    #[test]
    fn names_joined_on_the_replica_that_are_apart_here_are_sent_again_apart() {
        let dir = tempfile::tempdir().unwrap();
        // Here: a/cur/1 and b/cur/1 one file, c/cur/1 and g/cur/1 another
        // with the same content; d/cur/2 and e/cur/2 two files of the same
        // content.
        let mut s = sender_over(
            dir.path(),
            &[
                ("a/cur/1", b"x"),
                ("c/cur/1", b"x"),
                ("d/cur/2", b"y"),
                ("e/cur/2", b"y"),
            ],
        );
        for (from, to) in [("a/cur/1", "b/cur/1"), ("c/cur/1", "g/cur/1")] {
            let to = dir.path().join(to);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::hard_link(dir.path().join(from), to).unwrap();
        }
        let exact = manifest_with(
            &mut s,
            &[
                ("a/cur/1", 1),
                ("b/cur/1", 1),
                ("c/cur/1", 2),
                ("g/cur/1", 2),
            ],
        );
        // a, b and c one file there (g apart from it); d and e one file.
        let joined = manifest_with(
            &mut s,
            &[
                ("a/cur/1", 9),
                ("b/cur/1", 9),
                ("c/cur/1", 9),
                ("d/cur/2", 5),
                ("e/cur/2", 5),
            ],
        );
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        // Of d and e, the file with the smaller inode here stays.
        let (d_stays, moved) = if ino("d/cur/2") < ino("e/cur/2") {
            (true, "e/cur/2")
        } else {
            (false, "d/cur/2")
        };
        for chunk in [1, 4096] {
            let s = compared(dir.path(), &exact, chunk);
            assert!(in_queue(&s).is_empty(), "chunks of {chunk}");
            assert!(s.unjoin.is_empty());
            let mut s = compared(dir.path(), &joined, chunk);
            // c is taken from a and b's file there, and g follows it as a
            // link, after it; one of d and e is taken apart.
            let q = in_queue(&s);
            assert_eq!(q.len(), 3, "chunks of {chunk}: {q:?}");
            let at = |p: &str| q.iter().position(|n| n == p);
            assert!(
                at("c/cur/1") < at("g/cur/1") && at("g/cur/1").is_some(),
                "{q:?}"
            );
            assert!(q.iter().any(|n| n == moved), "{q:?} (d stays: {d_stays})");
            let mut unjoin: Vec<String> = s
                .unjoin
                .iter()
                .map(|(_, p)| p.to_string_lossy().into_owned())
                .collect();
            unjoin.sort();
            assert_eq!(unjoin, ["c/cur/1", moved], "chunks of {chunk}");
            // Said once, for the file sent; a file of another name is not
            // apart; a new comparison starts afresh.
            assert!(s.file_apart(0, Path::new("c/cur/1")));
            assert!(!s.file_apart(0, Path::new("c/cur/1")));
            assert!(!s.file_apart(0, Path::new("a/cur/1")));
            let _ = s.begin_comparison(false, false);
            assert!(!s.file_apart(0, Path::new(moved)));
        }
    }

    #[test]
    fn a_manifest_out_of_order_or_after_its_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sender_over(dir.path(), &[("x", b"1")]);
        let (on_way, _) = s.begin_comparison(false, true);
        let locals = s.local_entries(false);
        let mut cmp = s.start_compare(on_way, locals, true);
        let e = s
            .compare_chunk(
                &mut cmp,
                0,
                vec![
                    remote("b", EntryKind::File, 1),
                    remote("a", EntryKind::File, 2),
                ],
                false,
            )
            .unwrap_err();
        assert!(
            matches!(&e, CompareError::Manifest(ManifestError::OutOfOrder { store: 0, path }) if path == "a"),
            "{e}"
        );
        // Twice the same name is out of order too (across chunks).
        let e = s
            .compare_chunk(&mut cmp, 0, vec![remote("b", EntryKind::File, 1)], false)
            .unwrap_err();
        assert!(
            matches!(e, CompareError::Manifest(ManifestError::OutOfOrder { .. })),
            "{e}"
        );
        let e = s.compare_chunk(&mut cmp, 3, Vec::new(), true).unwrap_err();
        assert!(
            matches!(
                e,
                CompareError::Manifest(ManifestError::NoSuchStore { store: 3 })
            ),
            "{e}"
        );
        s.compare_chunk(&mut cmp, 0, vec![remote("c", EntryKind::File, 1)], true)
            .unwrap();
        assert!(cmp.complete());
        let e = s.compare_chunk(&mut cmp, 0, Vec::new(), true).unwrap_err();
        assert!(
            matches!(
                e,
                CompareError::Manifest(ManifestError::AfterLast { store: 0 })
            ),
            "{e}"
        );
    }

    /// Paths of the `KeepAside` frames in `bytes`.
    fn kept_aside(mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((frame, used)) = crate::wire::decode_frame(bytes).unwrap() {
            if let SyncMsg::KeepAside { path, .. } = SyncMsg::decode(&frame).unwrap() {
                out.push(String::from_utf8(path).unwrap());
            }
            bytes = &bytes[used..];
        }
        out.sort();
        out
    }

    #[test]
    fn a_former_primary_said_while_the_comparison_waits_has_its_genuine_conflicts_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sender_over(dir.path(), &[("m", b"mine")]);
        // What this node held as it took over: the old version of "m" and
        // "n" (deleted here since).
        let (old_m, n) = (11u128, 12u128);
        s.set_takeover_known(vec![Some([old_m, n].into_iter().collect())]);
        let (on_way, _) = s.begin_comparison(false, false);
        let locals = s.local_entries(false);
        let mut cmp = s.start_compare(on_way, locals, false);
        // The peer says what it is after the comparison started (its
        // first message, read while the manifest is awaited).
        s.on_peer_msg(SyncMsg::PeerState {
            former_primary: true,
            served_epoch: Some(1),
        })
        .unwrap();
        let manifest = [
            remote("m", EntryKind::File, old_m),
            remote("n", EntryKind::File, n),
            remote("o", EntryKind::File, 13),
            remote("p", EntryKind::File, 14),
        ];
        s.compare_chunk(&mut cmp, 0, manifest[..2].to_vec(), false)
            .unwrap();
        s.compare_chunk(&mut cmp, 0, manifest[2..].to_vec(), true)
            .unwrap();
        let (_, aside) = s.finish_compare(cmp);
        // "m" and "n" were held here at takeover (superseded by this
        // node's users); "o" and "p" never were: genuine conflicts.
        assert_eq!(kept_aside(&aside), ["o", "p"]);
    }
}
