//! The replica's decisions for the primary's ops on paths, apart from the
//! filesystem they run on.
//!
//! [`Applier`] decides what each `Mkdir`, `Delete`, `Rename`, `Link`,
//! `Symlink`, `DirMeta` and `KeepAside` does, and what a staged file's
//! landing does: which name to clear first (a folder where a file comes, a
//! file where a folder comes), when a source counts as missing (a link to a
//! name that holds other content or other times), which paths are protected
//! (a genuine conflict that could not be kept aside), which folders'
//! mtimes the primary said and when they apply again (after entries landed
//! in them, moved along with a folder's rename), how the index follows, and
//! which folders the next commit must flush. It performs them on a
//! [`ReplicaTree`]: the receiver's [`Root`] (real `renameat`, `linkat`, …)
//! or the data-path simulator's model filesystem with crash semantics and
//! faults, so the simulator runs these decisions themselves, not a copy.
//!
//! What it cannot do it reports as a [`Reply`]: the driver answers the
//! primary (`Need`, `Refused`) and raises its alarms (disk full, I/O
//! errors); staging, flushes and acknowledgements stay with the driver and
//! the group commit ([`super::commit::Pipeline`]).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::commit::Before;
use super::fsops::{FsError, LinkOutcome, RenameOutcome, Root};
use super::index::{self, Entry, Index, Kind, Stat};
use super::stats::{add, ReplStats};
use super::waiting::{Waiting, WaitingForRoom};
use crate::wire::sync::{Meta, NeedReason, SyncMsg};

/// A replica's filesystem, as the decisions use it. Paths are relative to
/// the store's root and already checked ([`super::fsops::check_rel`]).
pub trait ReplicaTree {
    /// lstat of `rel`; `Ok(None)` when nothing is there.
    fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>>;
    /// The names in folder `rel` (none if it is not a readable folder).
    fn list(&self, rel: &Path) -> Vec<std::ffi::OsString>;
    /// The content hash of the file at `rel`.
    fn hash(&self, rel: &Path, kind: Kind) -> io::Result<u128>;
    /// Makes folder `rel` (and missing parents) or updates its metadata;
    /// returns the parent to flush.
    fn mkdir(&mut self, rel: &Path, meta: &Meta) -> Result<PathBuf, FsError>;
    /// Refuses a folder's metadata as `mkdir` would.
    fn check_dir_meta(&self, rel: &Path, meta: &Meta) -> Result<(), FsError>;
    /// Sets a folder's times; `Ok(false)` if it is gone or not a folder.
    fn set_dir_times(&mut self, rel: &Path, meta: &Meta) -> Result<bool, FsError>;
    /// Removes a file, symlink or folder tree; returns the parent to flush.
    fn remove(&mut self, rel: &Path) -> Result<Option<PathBuf>, FsError>;
    /// Renames a file or folder (replacing a file at `to`, making `to`'s
    /// parents).
    fn rename(&mut self, from: &Path, to: &Path) -> Result<RenameOutcome, FsError>;
    /// Links `new` to the inode at `existing` (replacing a file at `new`).
    fn link(&mut self, existing: &Path, new: &Path) -> Result<LinkOutcome, FsError>;
    /// Makes (or replaces) a symlink; returns the parent to flush.
    fn symlink(&mut self, rel: &Path, target: &[u8], meta: &Meta) -> Result<PathBuf, FsError>;
    /// Moves what is at `rel` aside for the primary, durably; returns where
    /// it went, or `None` if nothing was there.
    fn keep_aside(&mut self, rel: &Path) -> Result<Option<PathBuf>, FsError>;
    /// Renames staged file `id` to `rel` (making parents); returns the
    /// parent to flush.
    fn land(&mut self, id: u64, rel: &Path) -> Result<PathBuf, FsError>;
    /// Forgets staged file `id`.
    fn discard_staged(&mut self, id: u64);
}

impl ReplicaTree for Root {
    fn list(&self, rel: &Path) -> Vec<std::ffi::OsString> {
        Root::list(self, rel)
    }

    fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        self.tree().lstat(rel)
    }
    fn hash(&self, rel: &Path, kind: Kind) -> io::Result<u128> {
        self.tree().hash(rel, kind)
    }
    fn mkdir(&mut self, rel: &Path, meta: &Meta) -> Result<PathBuf, FsError> {
        Root::mkdir(self, rel, meta)
    }
    fn check_dir_meta(&self, rel: &Path, meta: &Meta) -> Result<(), FsError> {
        Root::check_dir_meta(self, rel, meta)
    }
    fn set_dir_times(&mut self, rel: &Path, meta: &Meta) -> Result<bool, FsError> {
        Root::set_dir_times(self, rel, meta)
    }
    fn remove(&mut self, rel: &Path) -> Result<Option<PathBuf>, FsError> {
        Root::remove(self, rel, false)
    }
    fn rename(&mut self, from: &Path, to: &Path) -> Result<RenameOutcome, FsError> {
        Root::rename(self, from, to)
    }
    fn link(&mut self, existing: &Path, new: &Path) -> Result<LinkOutcome, FsError> {
        Root::link(self, existing, new)
    }
    fn symlink(&mut self, rel: &Path, target: &[u8], meta: &Meta) -> Result<PathBuf, FsError> {
        Root::symlink(self, rel, target, meta)
    }
    fn keep_aside(&mut self, rel: &Path) -> Result<Option<PathBuf>, FsError> {
        Root::keep_aside(self, rel)
    }
    fn land(&mut self, id: u64, rel: &Path) -> Result<PathBuf, FsError> {
        Root::land(self, id, rel, false)
    }
    fn discard_staged(&mut self, id: u64) {
        Root::discard_staged(self, id)
    }
}

/// How the replica answers an op its filesystem could not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The peer asked for something this node will not do: said once, not
    /// asked for again.
    Refuse,
    /// Asked for again (later, for a full disk or a local error).
    Need(NeedReason),
}

/// The answer to a failed op. A path through a symlink here is asked for
/// again rather than refused: the primary holds a folder at that name (it
/// sends no path through a symlink of its own), so the symlink is this
/// node's stale state, which the folder's `Mkdir` replaces; refused, the
/// op would never be sent again (found by the data-path simulator with a
/// name turning from symlink to folder: a message below it stayed missing
/// until a comparison, which does not count a refusal as drift).
pub fn answer(e: &FsError) -> Answer {
    if e.through_symlink() {
        Answer::Need(NeedReason::LocalError)
    } else if e.is_refusal() {
        Answer::Refuse
    } else if e.is_no_space() {
        Answer::Need(NeedReason::NoSpace)
    } else {
        Answer::Need(NeedReason::LocalError)
    }
}

/// The name whose file an op deletes or replaces, with its store: a
/// delete's, a rename's target, a link's or a symlink's name. A file
/// staged with the content that name holds lands before the op (see
/// [`land_first`]): if it finds no room, the op's decisions know it before
/// the content goes (simulator seed 27621: a rename onto the only copy of
/// a message whose other name was still staged, and then refused for room).
pub fn name_removed(msg: &SyncMsg) -> Option<(u16, &[u8])> {
    match msg {
        SyncMsg::Delete { store, path, .. }
        | SyncMsg::Link { store, path, .. }
        | SyncMsg::Symlink { store, path, .. }
        | SyncMsg::Mkdir { store, path, .. } => Some((*store, path)),
        SyncMsg::Rename {
            store, from, to, ..
        } if from != to => Some((*store, to)),
        _ => None,
    }
}

/// Whether an op of [`name_removed`] removes a folder at its name (and
/// what is below it): all but a `Mkdir`, which keeps one.
pub fn removes_a_folder(msg: &SyncMsg) -> bool {
    !matches!(msg, SyncMsg::Mkdir { .. })
}

/// Where a staged file will land: its store and its path there.
pub trait StagedAt {
    fn store(&self) -> usize;
    fn rel(&self) -> &Path;
    /// The content's hash, as the primary announced it.
    fn hash(&self) -> u128;
    /// The content's size in bytes.
    fn size(&self) -> u64;
}

/// Which staged files a message needs landed before it applies, as the
/// group commit's gate takes it ([`Pipeline::gate`](super::commit::Pipeline::gate)).
/// Files are staged as their data arrives and land at their group commit,
/// which may complete between any two frames; an op on a path may overtake
/// the files still staged only where it touches none of them (see
/// [`touches`]): an op must not make, change, move or remove a name whose
/// file is still on its way, nor a folder above one. A `Mkdir` too: a file
/// still staged at its name (the name turned from file to folder
/// meanwhile) would land over the new folder and remove what landed in
/// it. A manifest describes the tree as it is: everything lands first.
/// Nothing else (a file's data, a folder's times, the session's messages)
/// waits.
///
/// `gone`: for an op that deletes or replaces a name ([`name_removed`]),
/// what it removes (see [`Gone`]): a file staged
/// with the content of the file it removes lands first, and every staged
/// file before the removal of a folder, so that the delete of a message's
/// old name never lands before its new name does (if the new name finds
/// no room, [`Applier`] holds the delete back).
pub fn land_first<F: StagedAt>(msg: &SyncMsg, gone: Gone) -> Before<impl Fn(&F) -> bool + '_> {
    if gone == Gone::Folder && removes_a_folder(msg) {
        // Its files' contents are not looked up one by one: a folder's
        // removal is rare, and one flush for what is staged is cheap.
        return Before::All;
    }
    let gone = match gone {
        Gone::Content(hash) => Some(hash),
        Gone::Nothing | Gone::Folder => None,
    };
    let (store, paths): (u16, Vec<&[u8]>) = match msg {
        SyncMsg::Delete { store, path, .. }
        | SyncMsg::Mkdir { store, path, .. }
        | SyncMsg::Symlink { store, path, .. }
        | SyncMsg::KeepAside { store, path, .. } => (*store, vec![path]),
        SyncMsg::Rename {
            store, from, to, ..
        } => (*store, vec![from, to]),
        SyncMsg::Link {
            store,
            existing,
            path,
            ..
        } => (*store, vec![existing, path]),
        SyncMsg::ManifestRequest { .. } => return Before::All,
        _ => return Before::Nothing,
    };
    Before::Touching(move |f: &F| {
        f.store() == store as usize && (touches(f.rel(), &paths) || gone == Some(f.hash()))
    })
}

/// Names a folder's delete looks at for content waiting for room below it
/// (a walk of the folder on the disk; past it, the delete is not held).
const BELOW_LOOKED_AT_MAX: usize = 100_000;

/// What a `Delete` removes, as far as the files staged before it care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Nothing a staged file could be the new name of.
    Nothing,
    /// A file with this content (a staged file with it lands first).
    Content(u128),
    /// A folder (everything staged lands first).
    Folder,
}

/// The content (hash) and size of the regular file at `rel` whose state
/// `wanted` accepts: from the index where it knows the version there, else
/// read. `None` for anything else (no such name, a folder or symlink, a
/// file not wanted, a file that cannot be read).
pub fn content_at<T: ReplicaTree>(
    tree: &T,
    index: &Index,
    rel: &Path,
    wanted: impl Fn(&Stat) -> bool,
) -> Option<(u128, u64)> {
    let st = tree.lstat(rel).ok()??;
    if st.kind != Kind::File || !wanted(&st) {
        return None;
    }
    let hash = match index.get(rel) {
        Some(e) if e.kind == Kind::File && index::same_version(&e.version, &st.version) => e.hash(),
        _ => tree.hash(rel, Kind::File).ok()?,
    };
    Some((hash, st.version.size))
}

/// Whether a file staged at `staged` must land before an op on `paths`:
/// it is at or below one of them, or above one (a name the op would make a
/// folder of, which the file landing later would replace).
pub fn touches(staged: &Path, paths: &[&[u8]]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    paths.iter().any(|p| {
        let p = Path::new(std::ffi::OsStr::from_bytes(p));
        staged.starts_with(p) || p.starts_with(staged)
    })
}

/// An op on paths, its paths checked, as the replica applies it
/// ([`Applier::apply`]).
#[derive(Debug, Clone)]
pub enum PathOp {
    KeepAside {
        rel: PathBuf,
    },
    Mkdir {
        rel: PathBuf,
        meta: Meta,
    },
    DirMeta {
        rel: PathBuf,
        meta: Meta,
    },
    /// `unsure`: the primary found the name gone and does not know
    /// whether it moved (see [`SyncMsg::Delete`]).
    Delete {
        rel: PathBuf,
        unsure: bool,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Link {
        existing: PathBuf,
        rel: PathBuf,
        hash: u128,
        meta: Meta,
    },
    Symlink {
        rel: PathBuf,
        target: Vec<u8>,
        meta: Meta,
    },
}

/// What [`path_op`] made of a message.
#[derive(Debug)]
pub enum Parsed {
    /// An op on paths of store `store`, every path accepted.
    Op { seq: u64, store: u16, op: PathOp },
    /// A path was refused (and answered by the check): nothing applies.
    Refused,
    /// Not an op on paths: the driver handles it.
    Other(SyncMsg),
}

/// The op on paths `msg` carries, each path through `check` (with the op's
/// seq and store, in the order the op names them; `None`: refused, and
/// answered by `check`; an error ends the session). The receiver and the
/// data-path simulator parse ops with this one function.
pub fn path_op<E>(
    msg: SyncMsg,
    mut check: impl FnMut(u64, u16, &[u8]) -> Result<Option<PathBuf>, E>,
) -> Result<Parsed, E> {
    macro_rules! checked {
        ($seq:expr, $store:expr, $raw:expr) => {
            match check($seq, $store, $raw)? {
                Some(rel) => rel,
                None => return Ok(Parsed::Refused),
            }
        };
    }
    let (seq, store, op) = match msg {
        SyncMsg::KeepAside { seq, store, path } => (
            seq,
            store,
            PathOp::KeepAside {
                rel: checked!(seq, store, &path),
            },
        ),
        SyncMsg::Mkdir {
            seq,
            store,
            path,
            meta,
        } => (
            seq,
            store,
            PathOp::Mkdir {
                rel: checked!(seq, store, &path),
                meta,
            },
        ),
        SyncMsg::DirMeta {
            seq,
            store,
            path,
            meta,
        } => (
            seq,
            store,
            PathOp::DirMeta {
                rel: checked!(seq, store, &path),
                meta,
            },
        ),
        SyncMsg::Delete {
            seq,
            store,
            path,
            unsure,
        } => (
            seq,
            store,
            PathOp::Delete {
                rel: checked!(seq, store, &path),
                unsure,
            },
        ),
        SyncMsg::Rename {
            seq,
            store,
            from,
            to,
        } => {
            let from = checked!(seq, store, &from);
            let to = checked!(seq, store, &to);
            (seq, store, PathOp::Rename { from, to })
        }
        SyncMsg::Link {
            seq,
            store,
            existing,
            path,
            hash,
            meta,
        } => {
            let existing = checked!(seq, store, &existing);
            let rel = checked!(seq, store, &path);
            (
                seq,
                store,
                PathOp::Link {
                    existing,
                    rel,
                    hash,
                    meta,
                },
            )
        }
        SyncMsg::Symlink {
            seq,
            store,
            path,
            target,
            meta,
        } => (
            seq,
            store,
            PathOp::Symlink {
                rel: checked!(seq, store, &path),
                target,
                meta,
            },
        ),
        other => return Ok(Parsed::Other(other)),
    };
    Ok(Parsed::Op { seq, store, op })
}

/// What an op could not do, for the driver to answer (in order, before
/// anything else it sends).
#[derive(Debug)]
pub enum Reply {
    /// The primary must send `rel` again (or later).
    Need {
        seq: u64,
        store: usize,
        rel: PathBuf,
        reason: NeedReason,
    },
    /// The filesystem refused the op: the driver answers by the error's
    /// kind (refused, no space, an I/O error) and raises its alarms.
    Failed {
        seq: u64,
        store: usize,
        rel: PathBuf,
        error: FsError,
    },
    /// A `Delete` held back: the file's content (`size` bytes) waits for
    /// room under another name. Answered `Need` (`NoSpace`); the store
    /// counts as full until it has room for that size.
    HeldForRoom {
        seq: u64,
        store: usize,
        rel: PathBuf,
        size: u64,
    },
    /// A delete held back: the file's content was refused for room under
    /// another name, fits now, and is not sent again yet (asked for again,
    /// as a local error: the primary retries it soon; the store does not
    /// count as full).
    HeldForResend {
        seq: u64,
        store: usize,
        rel: PathBuf,
    },
    /// A delete held back: the file is the only copy here of what a rename
    /// that failed was to move onto another name, which has not landed
    /// since (asked for again, as a local error: the primary retries it).
    HeldForRename {
        seq: u64,
        store: usize,
        rel: PathBuf,
    },
    /// A genuine conflict was moved aside (to `kept`), to hand over.
    KeptAside {
        store: usize,
        rel: PathBuf,
        kept: PathBuf,
    },
    /// A genuine conflict could not be moved aside: the path is protected
    /// for the session (nothing replaces or deletes it).
    KeepAsideFailed {
        seq: u64,
        store: usize,
        rel: PathBuf,
        error: FsError,
    },
}

/// The replica's decisions for path ops, with what they remember between
/// ops of a session: protected paths, the folder times the primary said,
/// and the folders touched since the last commit.
pub struct Applier {
    stats: Arc<ReplStats>,
    /// Paths a genuine conflict could not be moved away from: nothing may
    /// replace or delete them in this session.
    protected: HashSet<(usize, PathBuf)>,
    /// What a rename onto a protected path left at its source, by source:
    /// the message the primary now holds at the target (`to`). It is the
    /// replica's only copy of it, so nothing deletes or replaces it while
    /// `to` stays protected (the primary deletes a refused rename's source
    /// and sends its target again, which waits for `to`). Kept from one
    /// receiver to the next ([`Applier::next_receiver`]): a new session's
    /// comparison protects `to` again (its `KeepAside` comes first) before
    /// it deletes the source. At most [`HELD_FOR_RENAME_MAX`].
    held_for_rename: HeldForRename,
    /// The names held sources had before a folder rename that may not be
    /// durable yet, with the targets they had: written to disk beside the
    /// holds (a power loss before the directory flush leaves the folder
    /// under its old name), never used for a decision here. Each with the
    /// change count at which this receiver's rename made it, so that it is
    /// let go of once a directory flush started after that made the rename
    /// durable; `None` for one an earlier receiver or the state directory
    /// passed on (its rename's flush is not known), kept until the engine
    /// starts again (which flushes the store first). At most
    /// [`HELD_FOR_RENAME_MAX`].
    held_old_names: HashMap<(usize, PathBuf), (PathBuf, Option<u64>)>,
    /// Bumped at every change of `held_for_rename` or `held_old_names`
    /// (the receiver writes them to disk when it moved).
    held_changes: u64,
    /// The folder renames this receiver applied that a directory flush
    /// has not made durable yet (store, from, to, the count of each, from
    /// `folder_renames`): a source held after one of them, under the
    /// folder's new name, is held under its old names too (a power loss
    /// leaves the folder there). At most [`HELD_FOR_RENAME_MAX`] (past
    /// it, the oldest are let go of: the bound's gap).
    renames_pending: VecDeque<(usize, PathBuf, PathBuf, u64)>,
    folder_renames: u64,
    /// Content the primary sent under a name where it found no room
    /// (answered `Need`, `NoSpace`). A `Delete` of a file with the same
    /// content under another name waits (answered `NoSpace` too, as
    /// [`Reply::HeldForRoom`]) until that name takes it, the primary says
    /// something else of that name, or the store has room for it: the
    /// delete of a message's old name must not land before its new name
    /// does (a rename the primary sends as a copy and a delete: after a
    /// cut, between sessions, a link whose first name goes), or a failover
    /// meanwhile finds the message nowhere in the tree. Passed on to the
    /// next receiver (see [`super::waiting`]).
    waiting: WaitingForRoom,
    /// Each folder's mtime as the primary last said (`Mkdir`, `DirMeta`).
    dir_times: HashMap<(usize, PathBuf), Meta>,
    /// Folders whose mtime to apply at the next commit's directory phase.
    retime: BTreeSet<(usize, PathBuf)>,
    /// Folders whose entries changed since the last directory flush.
    dirs: BTreeSet<(usize, PathBuf)>,
    replies: Vec<Reply>,
}

/// Why an op that deletes or replaces a file is held
/// ([`Applier::held_for_waiting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldFor {
    /// The file's content (this many bytes) waits for room under another
    /// name.
    Room(u64),
    /// It found room there and is not sent again yet.
    Resend,
}

/// What an op does to the file it holds back ([`Applier::held_for_waiting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// A delete (of a file, or a folder).
    Delete,
    /// A rename onto it, a file landing over it.
    Replace,
}

/// What an op does to the entry at its path (for [`Applier::blocked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touch {
    /// Removes or replaces it, and anything below it.
    Replace,
    /// Makes a folder there: keeps a folder, replaces anything else.
    Make,
    /// Moves it (a rename's source).
    Move,
}

/// How many renames onto held sources, one onto the next, a release
/// follows (each waits for the one it was renamed onto).
const HOLD_CHAIN_MAX: usize = 8;

/// Sources held for renames onto protected paths (see `Applier`): by
/// store and source, the target each waits for.
pub type HeldForRename = HashMap<(usize, PathBuf), PathBuf>;

/// Bound on the sources held for renames onto protected paths (each one
/// a path and its target: a few MB at most). Past it a rename's source is
/// not held: the gap of a replica that never held it (see INVARIANTS).
pub const HELD_FOR_RENAME_MAX: usize = 65_536;

fn parent_of(rel: &Path) -> PathBuf {
    rel.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// What becomes of a key of the folder records when folder `from` of store
/// `s` is renamed to `to`: `None`, it stays; `Some(None)`, it goes (a former
/// folder named `to`); `Some(Some(k))`, it moves to `k`.
fn on_folder_rename(
    key: &(usize, PathBuf),
    s: usize,
    from: &Path,
    to: &Path,
) -> Option<Option<(usize, PathBuf)>> {
    if key.0 != s {
        return None;
    }
    if let Some(moved) = super::moved_path(&key.1, from, to) {
        return Some(Some((s, moved)));
    }
    key.1.starts_with(to).then_some(None)
}

impl Applier {
    pub fn new(stats: Arc<ReplStats>) -> Applier {
        Applier {
            stats,
            protected: HashSet::new(),
            held_for_rename: HashMap::new(),
            held_old_names: HashMap::new(),
            held_changes: 0,
            renames_pending: VecDeque::new(),
            folder_renames: 0,
            waiting: WaitingForRoom::default(),
            dir_times: HashMap::new(),
            retime: BTreeSet::new(),
            dirs: BTreeSet::new(),
            replies: Vec::new(),
        }
    }

    /// The same decisions' state, without replies (a simulated crash goes
    /// back to it).
    #[cfg(any(test, feature = "tools"))]
    pub fn snapshot(&self) -> Applier {
        Applier {
            stats: self.stats.clone(),
            protected: self.protected.clone(),
            held_for_rename: self.held_for_rename.clone(),
            held_old_names: self.held_old_names.clone(),
            held_changes: self.held_changes,
            renames_pending: self.renames_pending.clone(),
            folder_renames: self.folder_renames,
            waiting: self.waiting.clone(),
            dir_times: self.dir_times.clone(),
            retime: self.retime.clone(),
            dirs: self.dirs.clone(),
            replies: Vec::new(),
        }
    }

    /// A session starts: no path is protected any more.
    pub fn begin_session(&mut self) {
        self.protected.clear();
    }

    /// The decisions a new receiver (the next connection's) starts from:
    /// afresh, but for the sources held for renames onto protected paths,
    /// which the engine passes on.
    pub fn next_receiver(&mut self) -> Applier {
        let mut next = Applier::new(self.stats.clone());
        next.held_for_rename = std::mem::take(&mut self.held_for_rename);
        // Their renames' flushes are this receiver's, not the next one's.
        next.held_old_names = std::mem::take(&mut self.held_old_names)
            .into_iter()
            .map(|(k, (to, _))| (k, (to, None)))
            .collect();
        // Folder renames not known durable: the next receiver's first
        // completed flush makes them so (count 0, before all of its own).
        next.renames_pending = std::mem::take(&mut self.renames_pending)
            .into_iter()
            .map(|(s, from, to, _)| (s, from, to, 0))
            .collect();
        // What waits for room still does (the next session may delete an
        // old name before it sends the new one again).
        next.waiting = self.take_waiting();
        self.held_changes += 1;
        next
    }

    /// The sources held for renames onto protected paths now.
    pub fn held_for_rename(&self) -> &HeldForRename {
        &self.held_for_rename
    }

    /// A count that moves whenever the sources held for renames change.
    pub fn held_changes(&self) -> u64 {
        self.held_changes
    }

    /// The holds as the state directory keeps them: the sources held for
    /// renames, and the names they had before a folder rename not known
    /// durable yet.
    pub fn held_to_save(&self) -> HeldForRename {
        let mut out: HeldForRename = self
            .held_old_names
            .iter()
            .map(|(k, (to, _))| (k.clone(), to.clone()))
            .collect();
        out.extend(
            self.held_for_rename
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        out
    }

    /// The sources held for renames onto protected paths (with the old
    /// names [`Applier::held_to_save`] adds), to pass on to the next
    /// receiver ([`Applier::hold_for_rename`]).
    pub fn take_held_for_rename(&mut self) -> HeldForRename {
        let out = self.held_to_save();
        self.held_changes += 1;
        self.held_for_rename.clear();
        self.held_old_names.clear();
        out
    }

    /// Takes on the sources an earlier receiver held (or the state
    /// directory kept); `gone`: those not in the tree now (a folder
    /// rename's other names), kept on disk only, until the engine starts
    /// again.
    pub fn hold_for_rename(
        &mut self,
        mut held: HeldForRename,
        gone: impl IntoIterator<Item = (usize, PathBuf)>,
    ) {
        self.held_changes += 1;
        self.held_old_names.clear();
        for key in gone {
            if let Some(to) = held.remove(&key) {
                self.held_old_names.insert(key, (to, None));
            }
        }
        self.held_for_rename = held;
    }

    /// What the ops so far could not do, oldest first.
    pub fn take_replies(&mut self) -> std::vec::Drain<'_, Reply> {
        self.replies.drain(..)
    }

    /// The folders whose entries changed since the last call (to flush).
    pub fn take_dirs(&mut self) -> BTreeSet<(usize, PathBuf)> {
        std::mem::take(&mut self.dirs)
    }

    fn need(&mut self, seq: u64, store: usize, rel: &Path, reason: NeedReason) {
        self.replies.push(Reply::Need {
            seq,
            store,
            rel: rel.to_path_buf(),
            reason,
        });
    }

    fn failed(&mut self, seq: u64, store: usize, rel: &Path, error: FsError) {
        self.replies.push(Reply::Failed {
            seq,
            store,
            rel: rel.to_path_buf(),
            error,
        });
    }

    /// Whether an op on `rel` must wait (answered with a `Need` then): a
    /// genuine conflict there (at `rel`, above or below it) could not be
    /// kept aside, or the op would change a source held for a rename onto
    /// one. Each such op tries to move the conflict aside again first: once
    /// the disk has room again the conflict is kept and the op goes on,
    /// without waiting for the next session.
    ///
    /// A conflict below `rel` counts only for an op that removes or
    /// replaces the folder `rel` ([`Touch::Replace`]); a `Mkdir` of a
    /// folder holding one, or a rename moving the folder (the protection
    /// moves along), leaves it where it is.
    fn blocked<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        s: usize,
        seq: u64,
        rel: &Path,
        touch: Touch,
    ) -> bool {
        for (h, to) in self.holds_touched(tree, s, rel, touch) {
            // Let go of only once the whole chain is released: a hold that
            // waits for one being released (a cycle) counts as released
            // with it, which holds only if all of it is.
            let mut let_go = Vec::new();
            if let Err(reason) = self.release(tree, s, &to, &mut vec![h.clone()], &mut let_go) {
                self.need(seq, s, rel, reason);
                return true;
            }
            // The rename's target can take the message now (the primary's
            // op on it follows): the source is the primary's to delete.
            let_go.push(h);
            for h in let_go {
                self.held_for_rename.remove(&(s, h));
                self.held_changes += 1;
            }
        }
        if let Err(reason) = self.unprotect(tree, s, rel, touch == Touch::Replace) {
            self.need(seq, s, rel, reason);
            return true;
        }
        false
    }

    /// The sources held for renames (and the targets they wait for) that
    /// an op touching `rel` would change, in path order: a held source, or
    /// a folder above one, removed or replaced; an entry that exists in a
    /// held folder (or the held source itself) replaced, moved, or turned
    /// into a folder. A name new in a held folder, or a `Mkdir` of the
    /// folder it is, changes nothing held.
    fn holds_touched<T: ReplicaTree>(
        &self,
        tree: &T,
        s: usize,
        rel: &Path,
        touch: Touch,
    ) -> Vec<(PathBuf, PathBuf)> {
        if self.held_for_rename.is_empty() {
            return Vec::new();
        }
        let mut inside = None;
        let mut held: Vec<(PathBuf, PathBuf)> = Vec::new();
        for ((hs, h), to) in &self.held_for_rename {
            if *hs != s {
                continue;
            }
            let touched = if touch == Touch::Replace && h.starts_with(rel) {
                true
            } else if rel.starts_with(h) {
                // What the op meets at `rel`, read once.
                *inside.get_or_insert_with(|| match tree.lstat(rel) {
                    Ok(Some(st)) => !(touch == Touch::Make && st.kind == Kind::Dir),
                    Ok(None) => false,
                    // Unknown: it may be there.
                    Err(_) => true,
                })
            } else {
                false
            };
            if touched {
                held.push((h.clone(), to.clone()));
            }
        }
        held.sort_unstable();
        held
    }

    /// Whether the target `to` of a held source can take the message now:
    /// the conflicts protected there moved aside, and the sources held
    /// there (a rename onto a held source waits for that one) released in
    /// turn, at most [`HOLD_CHAIN_MAX`] deep. `releasing`: the held sources
    /// whose targets are being released (this one's among them): a hold
    /// that waits for one of them (folders renamed away and back, each
    /// rename onto the other's name held) is released with it, not again.
    /// The holds released are added to `let_go`, for the caller to let go
    /// of if the whole chain is released. The reason to answer if not.
    fn release<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        s: usize,
        to: &Path,
        releasing: &mut Vec<PathBuf>,
        let_go: &mut Vec<PathBuf>,
    ) -> Result<(), NeedReason> {
        for (h, next) in self.holds_touched(tree, s, to, Touch::Replace) {
            if releasing.contains(&h) {
                continue;
            }
            // `releasing` starts with the first hold: this one is
            // `releasing.len()` deep.
            if releasing.len() > HOLD_CHAIN_MAX {
                return Err(NeedReason::LocalError);
            }
            releasing.push(h.clone());
            let released = self.release(tree, s, &next, releasing, let_go);
            releasing.pop();
            released?;
            let_go.push(h);
        }
        self.unprotect(tree, s, to, true)
    }

    /// Moves the genuine conflicts protected at `rel` (above it, or below
    /// it with `below`) aside, in path order; the first that still cannot
    /// be moved stops the rest, with the reason to answer.
    fn unprotect<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        s: usize,
        rel: &Path,
        below: bool,
    ) -> Result<(), NeedReason> {
        if !self.is_protected(s, rel) {
            return Ok(());
        }
        let mut here: Vec<PathBuf> = self
            .protected
            .iter()
            .filter(|(ps, p)| *ps == s && ((below && p.starts_with(rel)) || rel.starts_with(p)))
            .map(|(_, p)| p.clone())
            .collect();
        // In path order, not the set's (which differs from run to run): the
        // first that fails stops the rest.
        here.sort_unstable();
        for p in here {
            match tree.keep_aside(&p) {
                Ok(kept) => {
                    self.protected.remove(&(s, p.clone()));
                    if let Some(kept) = kept {
                        add(&self.stats.conflicts_kept, 1);
                        self.dirs.insert((s, parent_of(&p)));
                        self.replies.push(Reply::KeptAside {
                            store: s,
                            rel: p,
                            kept,
                        });
                    }
                }
                Err(e) => {
                    return Err(match answer(&e) {
                        Answer::Need(r) => r,
                        Answer::Refuse => NeedReason::LocalError,
                    });
                }
            }
        }
        Ok(())
    }

    /// A folder holding protected paths was renamed: they are protected
    /// under its new name.
    fn move_protection(&mut self, s: usize, from: &Path, to: &Path) {
        if self.protected.is_empty() {
            return;
        }
        let moved: Vec<PathBuf> = self
            .protected
            .iter()
            .filter(|(ps, p)| *ps == s && p.starts_with(from))
            .map(|(_, p)| p.clone())
            .collect();
        for p in moved {
            self.protected.remove(&(s, p.clone()));
            if let Some(q) = crate::model::moved_path(&p, from, to) {
                self.protected.insert((s, q));
            }
        }
    }

    /// A folder was renamed: the sources held in it, and the targets they
    /// wait for, follow it. The old names stay held as well until the
    /// rename is durable: a power loss before the directory flush leaves
    /// the folder under its old name, and the state directory's copy of
    /// the holds must protect the source there. The receiver lets go of a
    /// held name that is gone once a directory flush started after it went
    /// has completed ([`Applier::let_go_held`]).
    fn move_held(&mut self, s: usize, from: &Path, to: &Path) {
        if self.held_for_rename.is_empty() {
            return;
        }
        let moved: Vec<((usize, PathBuf), PathBuf)> = self
            .held_for_rename
            .iter()
            .filter(|((hs, _), _)| *hs == s)
            .filter_map(|((_, h), t)| {
                let h2 = crate::model::moved_path(h, from, to);
                let t2 = crate::model::moved_path(t, from, to);
                if h2.is_none() && t2.is_none() {
                    return None;
                }
                Some((
                    (s, h2.unwrap_or_else(|| h.clone())),
                    t2.unwrap_or_else(|| t.clone()),
                ))
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        self.held_changes += 1;
        let made = self.held_changes;
        // The old names of the sources that moved, for the disk (a name
        // gone, back and gone again takes the later count); past the bound
        // they are not kept (a power loss before the flush then finds
        // their sources unheld: the bound's gap).
        self.held_for_rename.retain(|(hs, h), t| {
            if *hs != s {
                return true;
            }
            let source_moved = crate::model::moved_path(h, from, to).is_some();
            if source_moved
                && (self.held_old_names.len() < HELD_FOR_RENAME_MAX
                    || self.held_old_names.contains_key(&(*hs, h.clone())))
            {
                self.held_old_names
                    .insert((*hs, h.clone()), (t.clone(), Some(made)));
            }
            !source_moved && crate::model::moved_path(t, from, to).is_none()
        });
        self.held_for_rename.extend(moved);
    }

    /// The old names this receiver's folder renames made (see
    /// `held_old_names`), by store, with the change count of each.
    pub fn held_old_names(&self) -> Vec<((usize, PathBuf), u64)> {
        let mut out: Vec<((usize, PathBuf), u64)> = self
            .held_old_names
            .iter()
            .filter_map(|(k, (_, made))| Some((k.clone(), (*made)?)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Lets go of old names that are gone from the tree (`gone`, found
    /// gone as a directory flush started that has since completed: the
    /// rename that moved them away is durable), unless a later rename made
    /// one again meanwhile.
    pub fn let_go_held(&mut self, gone: impl IntoIterator<Item = ((usize, PathBuf), u64)>) {
        for (key, made) in gone {
            if self
                .held_old_names
                .get(&key)
                .is_some_and(|(_, m)| *m == Some(made))
            {
                self.held_old_names.remove(&key);
                self.held_changes += 1;
            }
        }
    }

    /// The count of the folder renames applied so far (taken as a
    /// directory flush starts).
    pub fn folder_renames(&self) -> u64 {
        self.folder_renames
    }

    /// A directory flush that started when [`Applier::folder_renames`]
    /// said `upto` has completed: those renames are durable.
    pub fn folder_renames_durable(&mut self, upto: u64) {
        self.renames_pending.retain(|(.., made)| *made > upto);
    }

    /// A folder renamed here: remembered until it is durable.
    fn note_folder_rename(&mut self, s: usize, from: &Path, to: &Path) {
        self.folder_renames += 1;
        if self.renames_pending.len() >= HELD_FOR_RENAME_MAX {
            self.renames_pending.pop_front();
        }
        self.renames_pending.push_back((
            s,
            from.to_path_buf(),
            to.to_path_buf(),
            self.folder_renames,
        ));
    }

    /// Source `from` is now held for target `to`: under the names a folder
    /// rename not durable yet moved it from, too (newest rename first), as
    /// [`Applier::move_held`] keeps the names of sources held before it
    /// (simulator seed 38973: a folder renamed, a file in it renamed onto
    /// a protected name and held, and a crash before the directory flush
    /// found the file under the folder's old name, not held).
    fn hold_old_names_too(&mut self, s: usize, from: &Path, to: &Path) {
        let (mut h, mut t) = (from.to_path_buf(), to.to_path_buf());
        let mut old = Vec::new();
        for (rs, rfrom, rto, _) in self.renames_pending.iter().rev() {
            if *rs != s {
                continue;
            }
            let h_old = crate::model::moved_path(&h, rto, rfrom);
            if let Some(t_old) = crate::model::moved_path(&t, rto, rfrom) {
                t = t_old;
            }
            if let Some(h_old) = h_old {
                h = h_old;
                old.push((h.clone(), t.clone()));
            }
        }
        if old.is_empty() {
            return;
        }
        self.held_changes += 1;
        let made = self.held_changes;
        for (h, t) in old {
            if self.held_old_names.len() < HELD_FOR_RENAME_MAX {
                self.held_old_names.insert((s, h), (t, Some(made)));
            }
        }
    }

    /// Whether an op on `rel` must wait: a genuine conflict there could not
    /// be kept aside.
    pub fn is_protected(&self, s: usize, rel: &Path) -> bool {
        !self.protected.is_empty()
            && self
                .protected
                .iter()
                .any(|(ps, p)| *ps == s && (p.starts_with(rel) || rel.starts_with(p)))
    }

    /// Applies one op on paths of store `s` (what it could not do is in
    /// [`Applier::take_replies`]).
    pub fn apply<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        op: PathOp,
    ) {
        // The primary says something new of these names: what waited for
        // room under them waits no more (an op that again finds no room
        // says so again).
        // A rename moves what waits along (the content is wanted there
        // now); a name deleted or replaced lets go of what waits there (a
        // `Mkdir` of a folder of waiting names keeps them).
        if self.replacement_held(tree, index, s, seq, &op) {
            return;
        }
        match &op {
            PathOp::Rename { from, to } => self.waiting.rename(s, from, to),
            PathOp::Delete { rel, unsure } => self.waiting.forget(s, rel, seq, *unsure),
            PathOp::Symlink { rel, .. } => self.waiting.forget(s, rel, seq, false),
            _ => {}
        }
        match op {
            PathOp::KeepAside { rel } => self.keep_aside(tree, s, seq, rel),
            PathOp::Mkdir { rel, meta } => self.mkdir(tree, index, s, seq, rel, meta),
            PathOp::DirMeta { rel, meta } => self.dir_meta(tree, s, seq, rel, meta),
            PathOp::Delete { rel, unsure } => {
                if self.waiting.hold_delete(s, &rel) {
                    self.replies.push(Reply::HeldForRename {
                        seq,
                        store: s,
                        rel: rel.clone(),
                    });
                } else if self.waiting.hold_folder_delete(s, &rel) {
                    // A folder over a failed rename's source: held as the
                    // source's own delete is.
                    self.replies.push(Reply::HeldForRename {
                        seq,
                        store: s,
                        rel: rel.clone(),
                    });
                } else if self
                    .held_for_waiting(tree, index, s, seq, &rel, Removal::Delete, None)
                    .is_some()
                {
                    // Answered by it.
                } else if unsure && self.held_for_move(tree, index, s, seq, &rel) {
                    add(&self.stats.deletes_held_for_move, 1);
                    self.replies.push(Reply::Need {
                        seq,
                        store: s,
                        rel,
                        reason: NeedReason::MayHaveMoved,
                    });
                } else {
                    self.delete(tree, index, s, seq, &rel);
                }
            }
            PathOp::Rename { from, to } => self.rename(tree, index, s, seq, &from, &to),
            PathOp::Link {
                existing,
                rel,
                hash,
                meta,
            } => self.link(tree, index, s, seq, &existing, rel, hash, &meta),
            PathOp::Symlink { rel, target, meta } => {
                self.symlink(tree, index, s, seq, rel, &target, &meta)
            }
        }
    }

    /// A file the primary sent for `rel` (`seq`) found no room here (the
    /// driver's check before staging, or its staged file's writes): a
    /// delete of the same content elsewhere waits for it (see `waiting`).
    pub fn no_room(&mut self, s: usize, seq: u64, rel: &Path, hash: u128, size: u64) {
        self.waiting
            .insert(s, rel, Waiting::for_room(hash, size, seq));
    }

    /// Store `s` has `free` bytes: what fits there waits no more (sent
    /// again, it lands or waits again).
    pub fn room(&mut self, s: usize, free: u64) {
        self.waiting.room(s, free);
    }

    /// What waits for room, to pass on to the next connection's receiver.
    pub fn take_waiting(&mut self) -> WaitingForRoom {
        std::mem::take(&mut self.waiting).for_next_session()
    }

    /// Takes on what an earlier receiver left waiting for room.
    pub fn wait_for_room(&mut self, waiting: WaitingForRoom) {
        self.waiting = waiting;
    }

    /// The content and size of the file at `rel` if its content waits for
    /// room under another name (see `waiting`).
    fn content_waits_for_room<T: ReplicaTree>(
        &self,
        tree: &T,
        index: &Index,
        s: usize,
        rel: &Path,
    ) -> Option<(u128, u64)> {
        let (hash, size) = self.only_copy_of_a_waiting_size(tree, index, s, rel)?;
        self.waiting
            .waits_elsewhere(s, rel, hash)
            .then_some((hash, size))
    }

    /// The content and size of the file at `rel` if it is the only copy
    /// here of content the size of something that waits (for room, or its
    /// resend): the first look of every hold for what waits, cheap while
    /// nothing does. A file with other links keeps its content on the disk.
    fn only_copy_of_a_waiting_size<T: ReplicaTree>(
        &self,
        tree: &T,
        index: &Index,
        s: usize,
        rel: &Path,
    ) -> Option<(u128, u64)> {
        if !self.waiting.any_for_room() {
            return None;
        }
        content_at(tree, index, rel, |st| {
            st.nlink == 1 && self.waiting.size_waits(s, st.version.size)
        })
    }

    /// Whether an op that deletes or replaces `rel` waits for content that
    /// waits under another name, and what for; the answer is pushed.
    ///
    /// - For room: the file at `rel` is the only copy here of content that
    ///   waits for room under another name (or, for a delete, a folder
    ///   holds such a file: a bounded number of times, as the room it holds
    ///   may be what the content waits for). Answered `NoSpace`, the store
    ///   counting as full.
    /// - For its resend: that content found room and is not sent again yet
    ///   (see `waiting`'s `resend`): answered as a local error, a bounded
    ///   number of times, the store not counted as full.
    ///
    /// A file whose delete is held is also held as a name that may have
    /// moved (`waiting::MayHaveMoved`): once the same message lands under
    /// another name it goes at once, not at the primary's next retry (both
    /// names would be on the disk until then: a duplicate at a failover).
    /// A replacement (a rename onto it, a file landing over it) is held as
    /// its delete would be (simulator seed 27621: after a failover, a
    /// rename onto the only copy of a message whose other name waited for
    /// room). `keeps`: the content the op puts at `rel` (a link's, a
    /// landing's): a file there with it loses nothing.
    #[allow(clippy::too_many_arguments)]
    fn held_for_waiting<T: ReplicaTree>(
        &mut self,
        tree: &T,
        index: &Index,
        s: usize,
        seq: u64,
        rel: &Path,
        removal: Removal,
        keeps: Option<u128>,
    ) -> Option<HeldFor> {
        let delete = removal == Removal::Delete;
        // One look at the file (its content may be hashed): for room
        // first, then for the resend; a folder only for a delete.
        let (held, hash) = match self.only_copy_of_a_waiting_size(tree, index, s, rel) {
            Some((hash, _)) if keeps == Some(hash) => return None,
            Some((hash, size)) if self.waiting.waits_elsewhere(s, rel, hash) => {
                (HeldFor::Room(size), Some(hash))
            }
            Some((hash, _)) if self.waiting.hold_for_resend(s, rel, hash) => {
                (HeldFor::Resend, Some(hash))
            }
            Some(_) => return None,
            None if delete => {
                let size = self.content_waits_below(tree, index, s, rel)?;
                if !self.waiting.hold_folder_for_room(s, rel) {
                    return None;
                }
                (HeldFor::Room(size), None)
            }
            None => return None,
        };
        if let (true, Some(hash)) = (delete, hash) {
            if self.waiting.may_hold_move() {
                self.waiting.hold_for_move(s, rel, hash, seq);
            }
        }
        add(&self.stats.deletes_held_for_room, 1);
        let rel = rel.to_path_buf();
        self.replies.push(match held {
            HeldFor::Room(size) => Reply::HeldForRoom {
                seq,
                store: s,
                rel,
                size,
            },
            HeldFor::Resend => Reply::HeldForResend { seq, store: s, rel },
        });
        Some(held)
    }

    /// Whether an op that puts something at a name (a rename, a link, a
    /// symlink, a folder) is held for content that waits (see
    /// [`Applier::held_at_name`]). Answered if held.
    fn replacement_held<T: ReplicaTree>(
        &mut self,
        tree: &T,
        index: &Index,
        s: usize,
        seq: u64,
        op: &PathOp,
    ) -> bool {
        if !self.waiting.any_for_room() {
            return false;
        }
        let is_dir = |rel: &Path| matches!(tree.lstat(rel), Ok(Some(st)) if st.kind == Kind::Dir);
        let (rel, keeps, makes_dir) = match op {
            PathOp::Rename { from, to } if from != to => (to, None, is_dir(from)),
            PathOp::Link { rel, hash, .. } => (rel, Some(*hash), false),
            PathOp::Symlink { rel, .. } => (rel, None, false),
            PathOp::Mkdir { rel, .. } => (rel, None, true),
            _ => return false,
        };
        let held = self
            .held_at_name(tree, index, s, seq, rel, makes_dir, keeps)
            .is_some();
        if let (true, PathOp::Rename { from, to }) = (held, op) {
            // The primary deletes the source next and sends the target
            // again, as for a rename that failed: the source is the only
            // copy here of what it holds at `to` (simulator seed 39462: a
            // message renamed onto another's name, the rename held for
            // room, and the source's sure delete applied before the target
            // landed).
            if matches!(tree.lstat(from), Ok(Some(st)) if st.kind == Kind::File) {
                self.waiting.owe(s, from, to, seq);
            }
        }
        held
    }

    /// Whether putting something at `rel` (a folder if `makes_dir`; with
    /// content `keeps`, if known) is held for content that waits (see
    /// [`Applier::held_for_waiting`]): a file there as its replacement, a
    /// folder there that goes as its delete. A file there with the content
    /// put loses nothing. Answered if held.
    #[allow(clippy::too_many_arguments)]
    fn held_at_name<T: ReplicaTree>(
        &mut self,
        tree: &T,
        index: &Index,
        s: usize,
        seq: u64,
        rel: &Path,
        makes_dir: bool,
        keeps: Option<u128>,
    ) -> Option<HeldFor> {
        if !self.waiting.any_for_room() {
            return None;
        }
        let removal = match tree.lstat(rel) {
            Ok(Some(st)) if st.kind == Kind::Dir => {
                if makes_dir {
                    return None;
                }
                Removal::Delete
            }
            Ok(Some(_)) => Removal::Replace,
            _ => return None,
        };
        self.held_for_waiting(tree, index, s, seq, rel, removal, keeps)
    }

    /// An unsure delete of `rel` (the primary found it gone, maybe moved
    /// to a name still on its way): whether it is held, as the only copy
    /// here of its content, until that content lands under another name
    /// (the file then goes at once) or the primary, its queue's turn over,
    /// sends the delete again as a sure one. A folder that holds anything
    /// is held until the sure delete. A file with other links, or past
    /// [`super::waiting::MAY_HAVE_MOVED_BYTES_MAX`]: not held.
    fn held_for_move<T: ReplicaTree>(
        &mut self,
        tree: &T,
        index: &Index,
        s: usize,
        seq: u64,
        rel: &Path,
    ) -> bool {
        if matches!(tree.lstat(rel), Ok(Some(st)) if st.kind == Kind::Dir) {
            // A folder renamed away (its rename not read yet): what it
            // holds stays until the primary's sure delete, which comes
            // behind its new name's entries. Nothing to remember: no
            // landing releases it. An empty one holds no mail.
            return !tree.list(rel).is_empty();
        }
        if !self.waiting.may_hold_move() {
            return false;
        }
        let Some((hash, size)) = content_at(tree, index, rel, |st| st.nlink == 1) else {
            return false;
        };
        // The same message landed lately under another name, still there:
        // it did move, and is here.
        if let Some(at) = self.waiting.landed_elsewhere(s, rel, hash) {
            if content_at(tree, index, at, |_| true).is_some_and(|(h, _)| h == hash) {
                return false;
            }
        }
        size > 0 && self.waiting.hold_for_move(s, rel, hash, seq)
    }

    /// A folder at `rel` holds a file whose content waits for room under
    /// another name (a message copied, the copy refused for want of room,
    /// then the original's folder deleted): the folder's delete waits as
    /// the file's own would. Its size, or `None`. Looked up only while
    /// something waits.
    fn content_waits_below<T: ReplicaTree>(
        &self,
        tree: &T,
        index: &Index,
        s: usize,
        rel: &Path,
    ) -> Option<u64> {
        if !self.waiting.any_for_room()
            || !matches!(tree.lstat(rel), Ok(Some(st)) if st.kind == Kind::Dir)
        {
            return None;
        }
        // The disk, not the index: a replica restarted after a kill may
        // not have saved its index since the files landed. At most
        // `BELOW_LOOKED_AT_MAX` names (past them, not held).
        let mut todo = vec![rel.to_path_buf()];
        let mut looked_at = 0usize;
        while let Some(dir) = todo.pop() {
            for name in tree.list(&dir) {
                looked_at += 1;
                if looked_at > BELOW_LOOKED_AT_MAX {
                    return None;
                }
                let p = dir.join(name);
                match tree.lstat(&p) {
                    Ok(Some(st)) if st.kind == Kind::Dir => todo.push(p),
                    Ok(Some(st))
                        if st.kind == Kind::File && self.waiting.size_waits(s, st.version.size) =>
                    {
                        if let Some((_, size)) = self.content_waits_for_room(tree, index, s, &p) {
                            return Some(size);
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// `rel` took content `hash` (op `seq`): what waited for room for it
    /// waits no more, and the sources a failed rename kept for it whose
    /// delete the primary asked for meanwhile go now, with it.
    fn took<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        rel: &Path,
        seq: u64,
        hash: u128,
    ) {
        for from in self.waiting.landed(s, rel, seq, hash) {
            self.delete(tree, index, s, seq, &from);
        }
        // A name the primary found gone, held in case it moved: its
        // content has landed here, so it goes (if it still holds it).
        for from in self.waiting.moved_to(s, rel, hash) {
            if content_at(tree, index, &from, |_| true).is_some_and(|(h, _)| h == hash) {
                self.delete(tree, index, s, seq, &from);
            }
        }
    }

    /// A file or link for `rel` failed: if for want of room, a delete of
    /// its content elsewhere waits for it.
    fn failed_file(
        &mut self,
        seq: u64,
        s: usize,
        rel: &Path,
        hash: u128,
        size: u64,
        error: FsError,
    ) {
        if error.is_no_space() {
            self.no_room(s, seq, rel, hash, size);
        }
        self.failed(seq, s, rel, error);
    }

    /// `Mkdir`: the folder (a file there goes first), its times applied
    /// once the batch's entries there have landed.
    pub fn mkdir<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        rel: PathBuf,
        meta: Meta,
    ) {
        // A genuine conflict there (a file) would be cleared for the folder.
        if self.blocked(tree, s, seq, &rel, Touch::Make) {
            return;
        }
        self.clear_other_kind(tree, index, seq, s, &rel, true);
        match tree.mkdir(&rel, &meta) {
            Ok(parent) => {
                self.dirs.insert((s, parent));
                self.dir_times.insert((s, rel.clone()), meta);
                self.retime.insert((s, rel.clone()));
                if let Ok(Some(st)) = tree.lstat(&rel) {
                    index.set(rel, Entry::new(&st, 0, true));
                }
            }
            Err(e) => self.failed(seq, s, &rel, e),
        }
    }

    /// `DirMeta`: a folder's times, applied once the batch's entries there
    /// have landed.
    pub fn dir_meta<T: ReplicaTree>(
        &mut self,
        tree: &T,
        s: usize,
        seq: u64,
        rel: PathBuf,
        meta: Meta,
    ) {
        if let Err(e) = tree.check_dir_meta(&rel, &meta) {
            self.failed(seq, s, &rel, e);
            return;
        }
        self.dir_times.insert((s, rel.clone()), meta);
        self.retime.insert((s, rel));
    }

    /// `Delete` (a file, symlink or folder tree); nothing there is done.
    pub fn delete<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        rel: &Path,
    ) {
        if self.blocked(tree, s, seq, rel, Touch::Replace) {
            return;
        }
        if !matches!(tree.lstat(rel), Ok(Some(_))) {
            index.remove_tree(rel);
            return;
        }
        match tree.remove(rel) {
            Ok(parent) => {
                add(&self.stats.deletes_applied, 1);
                if let Some(p) = parent {
                    self.dirs.insert((s, p));
                }
                index.remove_tree(rel);
                self.waiting.deleted(s, rel);
            }
            Err(e) => self.failed(seq, s, rel, e),
        }
    }

    /// `Rename`: a missing source is asked for under its new name; a
    /// folder's said times move with it.
    #[allow(clippy::too_many_arguments)]
    pub fn rename<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        from: &Path,
        to: &Path,
    ) {
        // Not over a genuine conflict that could not be kept aside (the
        // rename would replace it), nor giving one the primary's name. A
        // folder holding one moves, its protection along.
        if self.blocked(tree, s, seq, from, Touch::Move) {
            return;
        }
        if self.blocked(tree, s, seq, to, Touch::Replace) {
            // The primary deletes the source of a rename refused and sends
            // its target again, which waits for `to` too: the source is the
            // only copy here of what the primary holds at `to`, held until
            // `to` can take it.
            if matches!(tree.lstat(from), Ok(Some(_)))
                && self.held_for_rename.len() < HELD_FOR_RENAME_MAX
            {
                self.held_for_rename
                    .insert((s, from.to_path_buf()), to.to_path_buf());
                self.held_changes += 1;
                if !self.renames_pending.is_empty() {
                    self.hold_old_names_too(s, from, to);
                }
            }
            return;
        }
        let mut folder = false;
        if let Ok(Some(src)) = tree.lstat(from) {
            folder = src.kind == Kind::Dir;
            self.clear_other_kind(tree, index, seq, s, to, folder);
        }
        match tree.rename(from, to) {
            Ok(RenameOutcome::Renamed) => {
                add(&self.stats.renames_applied, 1);
                self.dirs.insert((s, parent_of(from)));
                self.dirs.insert((s, parent_of(to)));
                index.rename_tree(from, to);
                if folder {
                    self.note_folder_rename(s, from, to);
                    self.move_dir_times(s, from, to);
                    self.move_protection(s, from, to);
                    self.move_held(s, from, to);
                }
            }
            Ok(RenameOutcome::SourceMissing) => {
                add(&self.stats.rename_sources_missing, 1);
                self.need(seq, s, to, NeedReason::SourceMissing);
            }
            Err(e) => {
                // The primary deletes the source next and sends the target
                // again: the source is the only copy here of what it holds
                // at `to`, kept until `to` lands (a failover in between
                // would find the message on neither name).
                // (A refusal is not sent again: nothing to wait for.)
                let file = matches!(tree.lstat(from), Ok(Some(st)) if st.kind == Kind::File);
                if file && matches!(answer(&e), Answer::Need(_)) {
                    self.waiting.owe(s, from, to, seq);
                }
                self.failed(seq, s, to, e)
            }
        }
    }

    /// `Link`: only to the version the primary linked (its content and
    /// times); anything else is a missing source, asked for again.
    #[allow(clippy::too_many_arguments)]
    pub fn link<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        existing: &Path,
        rel: PathBuf,
        hash: u128,
        meta: &Meta,
    ) {
        if self.blocked(tree, s, seq, &rel, Touch::Replace) {
            return;
        }
        // `existing` must hold the version the primary linked: an earlier
        // op that was to give it that content may have failed here, leaving
        // what the name held before; or the name holds the same content in
        // another inode, with other times (a message renamed over a copy of
        // itself).
        if content_differs(tree, index, existing, hash, meta) {
            add(&self.stats.rename_sources_missing, 1);
            self.need(seq, s, &rel, NeedReason::SourceMissing);
            return;
        }
        self.clear_other_kind(tree, index, seq, s, &rel, false);
        match tree.link(existing, &rel) {
            Ok(LinkOutcome::Linked) => {
                add(&self.stats.links_applied, 1);
                self.took(tree, index, s, &rel, seq, hash);
                self.dirs.insert((s, parent_of(&rel)));
                if let Some(e) = index.get(existing) {
                    index.set(rel, e);
                }
            }
            Ok(LinkOutcome::SourceMissing) => {
                add(&self.stats.rename_sources_missing, 1);
                self.need(seq, s, &rel, NeedReason::SourceMissing);
            }
            Err(e) => {
                let size = match tree.lstat(existing) {
                    Ok(Some(st)) => st.version.size,
                    _ => 0,
                };
                self.failed_file(seq, s, &rel, hash, size, e)
            }
        }
    }

    /// `Symlink`: made or replaced (a folder there goes first).
    #[allow(clippy::too_many_arguments)]
    pub fn symlink<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        rel: PathBuf,
        target: &[u8],
        meta: &Meta,
    ) {
        if self.blocked(tree, s, seq, &rel, Touch::Replace) {
            return;
        }
        self.clear_other_kind(tree, index, seq, s, &rel, false);
        match tree.symlink(&rel, target, meta) {
            Ok(parent) => {
                self.dirs.insert((s, parent));
                if let Ok(Some(st)) = tree.lstat(&rel) {
                    let h = index::hash_bytes(target);
                    index.set(rel, Entry::new(&st, h, true));
                }
            }
            Err(e) => self.failed(seq, s, &rel, e),
        }
    }

    /// `KeepAside`: the primary says the version at `rel` is a genuine
    /// conflict: move it aside (durably) to hand over. If that fails, the
    /// path is protected for the session.
    pub fn keep_aside<T: ReplicaTree>(&mut self, tree: &mut T, s: usize, seq: u64, rel: PathBuf) {
        match tree.keep_aside(&rel) {
            Ok(Some(kept)) => {
                add(&self.stats.conflicts_kept, 1);
                self.dirs.insert((s, parent_of(&rel)));
                self.replies.push(Reply::KeptAside {
                    store: s,
                    rel,
                    kept,
                });
            }
            Ok(None) => {}
            Err(error) => {
                self.protected.insert((s, rel.clone()));
                self.replies.push(Reply::KeepAsideFailed {
                    seq,
                    store: s,
                    rel,
                    error,
                });
            }
        }
    }

    /// Lands staged file `seq` (content flushed) at `rel`: the primary's
    /// version replaces what is here. A version only a former primary held
    /// was kept aside before, on the primary's word (`KeepAside`): the
    /// replica never guesses from its own index, which a crash can leave
    /// behind. `staged`: the staged file's state as written, or why
    /// writing it failed (the staging thread's writes and metadata, known
    /// only now): it is discarded and asked for again. `apart`: it must
    /// not keep an inode this name shares with other names here (see
    /// `SyncMsg::File`).
    #[allow(clippy::too_many_arguments)]
    pub fn land<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        seq: u64,
        rel: PathBuf,
        hash: u128,
        size: u64,
        apart: bool,
        staged: Result<Option<Stat>, FsError>,
    ) {
        let staged = match staged {
            Ok(st) => st,
            Err(e) => {
                tree.discard_staged(seq);
                self.failed_file(seq, s, &rel, hash, size, e);
                return;
            }
        };
        if self.blocked(tree, s, seq, &rel, Touch::Replace) {
            tree.discard_staged(seq);
            return;
        }
        // Over the only copy of content that waits (a file, or a folder
        // holding one): sent again, the primary retries it. Held for room,
        // its own content waits for room too, as a file refused for it does.
        if let Some(held) = self.held_at_name(tree, index, s, seq, &rel, false, Some(hash)) {
            tree.discard_staged(seq);
            if matches!(held, HeldFor::Room(_)) {
                self.no_room(s, seq, &rel, hash, size);
            }
            return;
        }
        if let Ok(Some(cur)) = tree.lstat(&rel) {
            if cur.kind == Kind::Dir {
                // The primary has a file where this replica has a folder.
                self.delete(tree, index, s, seq, &rel);
            }
            let same = cur.kind == Kind::File
                && cur.version.size == size
                && tree.hash(&rel, Kind::File).ok() == Some(hash);
            // The same content and metadata already here: keep the file.
            // Under a name that shares its inode (a message linked into
            // another folder while its first copy was in flight) the link
            // stays a link; and a copy renamed over a durable one would
            // put it at the mercy of the next flush, whose failure
            // discards what landed since (simulator seed 25475: the same
            // message sent again before its first copy's ack, the second
            // landing discarded by a failed flush, the name gone).
            //
            // Unless the primary holds this name apart from the others
            // that share its inode here (names joined here after a refused
            // rename, say): then the copy lands in an inode of its own.
            let joined_here = apart && cur.nlink > 1;
            if same && !joined_here && staged.is_some_and(|st| st.meta == cur.meta) {
                self.took(tree, index, s, &rel, seq, hash);
                tree.discard_staged(seq);
                add(&self.stats.files_landed, 1);
                add(&self.stats.bytes_landed, size);
                index.set(rel, Entry::new(&cur, hash, true));
                return;
            }
        }
        match tree.land(seq, &rel) {
            Ok(parent) => {
                // Landed: what waited for room here (this op, or one before
                // it) has its name.
                self.took(tree, index, s, &rel, seq, hash);
                self.dirs.insert((s, parent));
                add(&self.stats.files_landed, 1);
                add(&self.stats.bytes_landed, size);
                let st = match staged {
                    Some(mut st) => {
                        // Unknown after the rename; matched on the rest.
                        st.version.ctime_s = 0;
                        st.version.ctime_ns = 0;
                        Some(st)
                    }
                    None => tree.lstat(&rel).ok().flatten(),
                };
                if let Some(st) = st {
                    index.set(rel, Entry::new(&st, hash, true));
                }
            }
            Err(e) => {
                tree.discard_staged(seq);
                self.failed_file(seq, s, &rel, hash, size, e);
            }
        }
    }

    /// Removes (or keeps aside, as a delete would) a folder where the
    /// primary now has a file, or a file or symlink where it has a folder:
    /// the op that follows could never replace it (what waits was looked
    /// at before: [`Applier::held_at_name`]).
    fn clear_other_kind<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        seq: u64,
        s: usize,
        rel: &Path,
        want_dir: bool,
    ) {
        if let Ok(Some(cur)) = tree.lstat(rel) {
            if (cur.kind == Kind::Dir) != want_dir {
                self.delete(tree, index, s, seq, rel);
            }
        }
    }

    /// A folder moved from `from` to `to`: the mtimes the primary said for
    /// its subtree move with it, and whatever was said for folders that
    /// had the name `to` before no longer applies (applied to the folder
    /// now there, it would set an older folder's mtime).
    fn move_dir_times(&mut self, s: usize, from: &Path, to: &Path) {
        let changes = |keys: &mut dyn Iterator<Item = &(usize, PathBuf)>| -> Vec<_> {
            keys.filter_map(|k| on_folder_rename(k, s, from, to).map(|n| (k.clone(), n)))
                .collect()
        };
        // Every old key out first, then the moved ones in: a moved key may
        // take the name of one that goes.
        for set in [&mut self.dirs, &mut self.retime] {
            let change = changes(&mut set.iter());
            for (old, _) in &change {
                set.remove(old);
            }
            set.extend(change.into_iter().filter_map(|(_, new)| new));
        }
        let change = changes(&mut self.dir_times.keys());
        let metas: Vec<_> = change
            .into_iter()
            .filter_map(|(old, new)| Some((new, self.dir_times.remove(&old)?)))
            .collect();
        self.dir_times
            .extend(metas.into_iter().filter_map(|(new, m)| Some((new?, m))));
    }

    /// Entries landed (or were removed) in these folders since the last
    /// commit, or the primary said their times: their mtime is the
    /// primary's again, before the flush that makes the directories
    /// durable. Each folder once; [`Applier::retime`] sets each.
    pub fn dir_times_due(&mut self) -> Vec<(usize, PathBuf, Meta)> {
        let retime = std::mem::take(&mut self.retime);
        let touched: BTreeSet<&(usize, PathBuf)> = self.dirs.iter().chain(retime.iter()).collect();
        touched
            .into_iter()
            .filter_map(|k| Some((k.0, k.1.clone(), *self.dir_times.get(k)?)))
            .collect()
    }

    /// Sets folder `dir`'s times to what the primary said; a folder gone
    /// (or no longer one) is forgotten.
    pub fn retime<T: ReplicaTree>(
        &mut self,
        tree: &mut T,
        index: &mut Index,
        s: usize,
        dir: PathBuf,
        meta: &Meta,
    ) -> Result<(), FsError> {
        if tree.set_dir_times(&dir, meta)? {
            if let Ok(Some(st)) = tree.lstat(&dir) {
                index.set(dir, Entry::new(&st, 0, true));
            }
        } else {
            self.dir_times.remove(&(s, dir));
        }
        Ok(())
    }
}

/// Whether the regular file at `rel` holds content other than what hashes
/// to `hash` with `meta`'s times (known from the index when the file is the
/// version it recorded, else read). Nothing there, or something else than a
/// regular file, is for `link` itself to answer.
fn content_differs<T: ReplicaTree>(
    tree: &T,
    index: &Index,
    rel: &Path,
    hash: u128,
    meta: &Meta,
) -> bool {
    let Ok(Some(st)) = tree.lstat(rel) else {
        return false;
    };
    if st.kind != Kind::File {
        return false;
    }
    if (st.meta.mtime_sec, st.meta.mtime_nsec) != (meta.mtime_sec, meta.mtime_nsec) {
        return true;
    }
    if let Some(e) = index.get(rel) {
        if e.kind == Kind::File && index.unchanged_and_synced(rel, &st) {
            return e.hash() != hash;
        }
    }
    tree.hash(rel, Kind::File).ok() != Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mtime_sec: i64) -> Meta {
        Meta {
            mode: 0o755,
            mtime_sec,
            ..Meta::default()
        }
    }

    /// A genuine conflict that could not be kept aside (its path
    /// protected) is never replaced by a rename over it: the rename first
    /// moves it aside, then goes on. A rename of its folder moves it, and
    /// its protection along: a delete of the folder's new name keeps it
    /// aside first.
    #[test]
    fn a_rename_over_or_of_a_protected_conflict_keeps_it_aside_first() {
        let (_tmp, dir, internal) = store_with(&[
            ("cur/x", "genuine"),
            ("new/y", "primary's"),
            ("f/z", "genuine too"),
        ]);
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let mut r = Applier::new(Arc::new(ReplStats::default()));
        let kept = |r: &mut Applier| -> Vec<PathBuf> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::KeptAside { rel, .. } => Some(rel),
                    _ => None,
                })
                .collect()
        };
        r.protected.insert((0, PathBuf::from("cur/x")));
        r.rename(
            &mut root,
            &mut index,
            0,
            1,
            Path::new("new/y"),
            Path::new("cur/x"),
        );
        assert_eq!(kept(&mut r), [PathBuf::from("cur/x")]);
        assert_eq!(std::fs::read(dir.join("cur/x")).unwrap(), b"primary's");
        r.protected.insert((0, PathBuf::from("f/z")));
        r.rename(&mut root, &mut index, 0, 2, Path::new("f"), Path::new("g"));
        assert!(kept(&mut r).is_empty());
        assert_eq!(std::fs::read(dir.join("g/z")).unwrap(), b"genuine too");
        assert_eq!(
            r.protected.iter().cloned().collect::<Vec<_>>(),
            [(0, PathBuf::from("g/z"))]
        );
        r.delete(&mut root, &mut index, 0, 3, Path::new("g"));
        assert_eq!(kept(&mut r), [PathBuf::from("g/z")]);
        assert!(!dir.join("g").exists());
        assert!(r.protected.is_empty());
        let aside: Vec<String> = walk(&internal)
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(aside.len(), 2, "{aside:?}");
    }

    /// A rename onto a path where a genuine conflict waits that cannot be
    /// moved aside (here: the conflicts directory gone) leaves its source
    /// as the replica's only copy of the message: the primary's delete of
    /// the source waits (answered with a `Need`) while the conflict stays,
    /// across a rename of its folder and into the next receiver, whose
    /// session protects the target again; once the conflict can be moved
    /// aside, the delete goes on.
    #[test]
    fn a_rename_onto_a_conflict_that_cannot_be_kept_holds_its_source_until_it_can() {
        let (_tmp, dir, internal, mut root, mut index, mut r) =
            conflicts_cannot_be_kept(&[("new/m", "the message"), ("cur/m:2,S", "genuine")]);
        let needs = |r: &mut Applier| -> Vec<(u64, PathBuf)> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::Need { seq, rel, .. } => Some((seq, rel)),
                    _ => None,
                })
                .collect()
        };
        let (m, flagged) = (Path::new("new/m"), Path::new("cur/m:2,S"));
        r.keep_aside(&mut root, 0, 1, flagged.to_path_buf());
        assert!(r.is_protected(0, flagged));
        r.rename(&mut root, &mut index, 0, 2, m, flagged);
        assert_eq!(needs(&mut r), [(2, flagged.to_path_buf())]);
        // The primary deletes the refused rename's source: it waits.
        r.delete(&mut root, &mut index, 0, 3, m);
        assert_eq!(needs(&mut r), [(3, m.to_path_buf())]);
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), b"the message");
        // So does a delete of its folder, or anything put over it.
        r.delete(&mut root, &mut index, 0, 4, Path::new("new"));
        assert_eq!(needs(&mut r), [(4, PathBuf::from("new"))]);
        r.symlink(&mut root, &mut index, 0, 5, m.to_path_buf(), b"x", &meta(1));
        assert_eq!(needs(&mut r), [(5, m.to_path_buf())]);
        // Its folder renamed: held under the new name.
        r.rename(
            &mut root,
            &mut index,
            0,
            6,
            Path::new("new"),
            Path::new("old"),
        );
        assert!(needs(&mut r).is_empty());
        let moved = Path::new("old/m");
        assert_eq!(std::fs::read(dir.join(moved)).unwrap(), b"the message");
        // The next connection's receiver: its session's comparison keeps
        // the conflict aside first, which fails again.
        let mut r = r.next_receiver();
        r.begin_session();
        r.keep_aside(&mut root, 0, 1, flagged.to_path_buf());
        r.delete(&mut root, &mut index, 0, 2, moved);
        assert_eq!(needs(&mut r), [(2, moved.to_path_buf())]);
        assert_eq!(std::fs::read(dir.join(moved)).unwrap(), b"the message");
        // Room again: the conflict goes aside, then the source.
        let mut root = Root::open(&dir, &internal).unwrap();
        r.delete(&mut root, &mut index, 0, 3, moved);
        let replies: Vec<Reply> = r.take_replies().collect();
        assert!(
            matches!(&replies[..], [Reply::KeptAside { rel, .. }] if rel == flagged),
            "{replies:?}"
        );
        assert!(!dir.join(moved).exists());
        assert!(r.held_for_rename().is_empty());
        // Only the folder's name before its rename is still saved (for a
        // power loss; the engine lets it go as it starts), held for
        // nothing.
        assert_eq!(
            r.take_held_for_rename().into_keys().collect::<Vec<_>>(),
            [(0, m.to_path_buf())]
        );
        assert!(!r.is_protected(0, flagged));
    }

    /// A rename onto a held source is held in turn, and released with it;
    /// a held folder keeps what it holds, but takes new names (a mailbox
    /// made again under the old name) and a `Mkdir` of itself.
    #[test]
    fn a_rename_onto_a_held_source_waits_for_it_and_a_held_folder_takes_new_names() {
        let (_tmp, dir, internal, mut root, mut index, mut r) = conflicts_cannot_be_kept(&[
            ("new/m", "the message"),
            ("cur/m:2,S", "genuine"),
            ("new/x", "another"),
            ("A/cur/a", "in A"),
            ("B/cur/b", "genuine too"),
        ]);
        let needs = |r: &mut Applier| -> Vec<u64> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::Need { seq, .. } => Some(seq),
                    _ => None,
                })
                .collect()
        };
        let p = Path::new;
        r.keep_aside(&mut root, 0, 1, p("cur/m:2,S").to_path_buf());
        r.keep_aside(&mut root, 0, 2, p("B/cur/b").to_path_buf());
        r.rename(&mut root, &mut index, 0, 3, p("new/m"), p("cur/m:2,S"));
        r.rename(&mut root, &mut index, 0, 4, p("new/x"), p("new/m"));
        r.rename(&mut root, &mut index, 0, 5, p("A"), p("B"));
        assert_eq!(needs(&mut r), [3, 4, 5]);
        r.delete(&mut root, &mut index, 0, 6, p("new/x"));
        r.delete(&mut root, &mut index, 0, 7, p("A/cur/a"));
        r.symlink(
            &mut root,
            &mut index,
            0,
            8,
            p("A/cur/a").into(),
            b"t",
            &meta(1),
        );
        assert_eq!(needs(&mut r), [6, 7, 8]);
        r.mkdir(&mut root, &mut index, 0, 9, p("A").into(), meta(1));
        r.symlink(
            &mut root,
            &mut index,
            0,
            10,
            p("A/cur/new").into(),
            b"t",
            &meta(1),
        );
        assert!(needs(&mut r).is_empty());
        assert_eq!(std::fs::read_link(dir.join("A/cur/new")).unwrap(), p("t"));
        for (f, body) in [
            ("new/x", "another"),
            ("new/m", "the message"),
            ("A/cur/a", "in A"),
        ] {
            assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), body);
        }
        // Room again: the chain is released from its end.
        let mut root = Root::open(&dir, &internal).unwrap();
        r.delete(&mut root, &mut index, 0, 11, p("new/x"));
        assert!(needs(&mut r).is_empty());
        assert!(!dir.join("new/x").exists());
        let held = r.take_held_for_rename();
        assert_eq!(
            held.into_keys().collect::<Vec<_>>(),
            [(0, PathBuf::from("A"))],
            "new/m and new/x released, A still waits for B"
        );
    }

    /// A folder holding a held source renamed: both names stay held until
    /// the rename is durable (a power loss before the directory flush
    /// leaves the old one), then the name gone is let go of.
    #[test]
    fn a_held_folder_renamed_keeps_its_old_name_held_until_the_rename_is_durable() {
        let (_tmp, dir, _, mut root, mut index, mut r) =
            conflicts_cannot_be_kept(&[(".F/new/m", "the message"), (".F/cur/m:2,S", "genuine")]);
        let p = Path::new;
        r.keep_aside(&mut root, 0, 1, p(".F/cur/m:2,S").to_path_buf());
        r.rename(
            &mut root,
            &mut index,
            0,
            2,
            p(".F/new/m"),
            p(".F/cur/m:2,S"),
        );
        let saved = |r: &Applier| {
            let mut v: Vec<(PathBuf, PathBuf)> = r
                .held_to_save()
                .into_iter()
                .map(|((_, h), t)| (h, t))
                .collect();
            v.sort();
            v
        };
        let pair = |h: &str, t: &str| (PathBuf::from(h), PathBuf::from(t));
        assert_eq!(saved(&r), [pair(".F/new/m", ".F/cur/m:2,S")]);
        let changes = r.held_changes();
        r.rename(&mut root, &mut index, 0, 3, p(".F"), p(".G"));
        assert_eq!(std::fs::read(dir.join(".G/new/m")).unwrap(), b"the message");
        assert!(
            r.held_changes() > changes,
            "the state directory's copy is written again"
        );
        assert_eq!(
            saved(&r),
            [
                pair(".F/new/m", ".F/cur/m:2,S"),
                pair(".G/new/m", ".G/cur/m:2,S")
            ],
            "the new names, and the old ones for a power loss before the flush"
        );
        assert_eq!(
            r.held_for_rename().keys().collect::<Vec<_>>(),
            [&(0, p(".G/new/m").to_path_buf())],
            "only the new name counts for the ops"
        );
        // The receiver's flush: the old names gone as it starts are let go
        // of once it completes, unless a later rename made one again.
        let gone_at_flush: Vec<((usize, PathBuf), u64)> = r
            .held_old_names()
            .into_iter()
            .filter(|((_, h), _)| matches!(root.lstat(h), Ok(None)))
            .collect();
        assert_eq!(gone_at_flush.len(), 1);
        r.rename(&mut root, &mut index, 0, 4, p(".G"), p(".F"));
        r.rename(&mut root, &mut index, 0, 5, p(".F"), p(".G"));
        r.let_go_held(gone_at_flush);
        assert!(
            saved(&r).contains(&pair(".F/new/m", ".F/cur/m:2,S")),
            "gone, back and gone again during the flush: that rename may not be durable"
        );
        let gone_at_flush: Vec<((usize, PathBuf), u64)> = r.held_old_names();
        r.let_go_held(gone_at_flush);
        assert_eq!(saved(&r), [pair(".G/new/m", ".G/cur/m:2,S")]);
        // Passed to the next connection's receiver before a flush: the old
        // name stays saved (not a hold), and that receiver's flushes do not
        // let it go (they need not cover the rename); the engine's next
        // start does, after it flushes the store.
        r.rename(&mut root, &mut index, 0, 6, p(".G"), p(".H"));
        let mut next = Applier::new(Arc::new(ReplStats::default()));
        let held = r.take_held_for_rename();
        let gone: Vec<(usize, PathBuf)> = held
            .keys()
            .filter(|(_, h)| matches!(root.lstat(h), Ok(None)))
            .cloned()
            .collect();
        next.hold_for_rename(held, gone);
        assert_eq!(saved(&next).len(), 2);
        assert_eq!(next.held_for_rename().len(), 1);
        assert!(
            next.held_old_names().is_empty(),
            "none of its own to let go of"
        );
    }

    /// A source held after its folder's rename, the rename not durable
    /// yet: held under the folder's old name too (a power loss before the
    /// directory flush leaves the file there; simulator seed 38973), until
    /// a flush that started after the rename completes.
    #[test]
    fn a_source_held_after_its_folders_rename_is_held_under_the_old_name_too() {
        let (_tmp, dir, _, mut root, mut index, mut r) =
            conflicts_cannot_be_kept(&[(".F/new/m", "the message"), ("cur/x:2,S", "genuine")]);
        let p = Path::new;
        r.keep_aside(&mut root, 0, 1, p("cur/x:2,S").to_path_buf());
        r.rename(&mut root, &mut index, 0, 2, p(".F"), p(".G"));
        let flush_from = r.folder_renames();
        r.rename(&mut root, &mut index, 0, 3, p(".G/new/m"), p("cur/x:2,S"));
        let mut saved: Vec<PathBuf> = r.held_to_save().into_keys().map(|(_, h)| h).collect();
        saved.sort();
        assert_eq!(saved, [p(".F/new/m"), p(".G/new/m")]);
        assert_eq!(
            r.held_for_rename().keys().collect::<Vec<_>>(),
            [&(0, p(".G/new/m").to_path_buf())],
            "only the name in the tree counts for the ops"
        );
        // A flush that started after the rename completes: the old name,
        // gone, is let go of, and a later hold takes no old name.
        let gone: Vec<((usize, PathBuf), u64)> = r.held_old_names();
        r.folder_renames_durable(flush_from);
        r.let_go_held(gone);
        assert_eq!(r.held_to_save().len(), 1);
        std::fs::write(dir.join(".G/new/n"), "another").unwrap();
        r.rename(&mut root, &mut index, 0, 4, p(".G/new/n"), p("cur/x:2,S"));
        assert_eq!(r.held_to_save().len(), 2, "its own name only");
    }

    /// The times of the file at `path`, as a `Meta` (the rest default):
    /// what the primary says of a file it links.
    fn times_of(path: &Path) -> Meta {
        let on_disk = std::fs::metadata(path).unwrap();
        Meta {
            mtime_sec: std::os::unix::fs::MetadataExt::mtime(&on_disk),
            mtime_nsec: std::os::unix::fs::MetadataExt::mtime_nsec(&on_disk) as u32,
            ..Meta::default()
        }
    }

    /// A file that arrives with the content and metadata its name already
    /// holds keeps that name's file, links and all, unless it comes
    /// `apart` (the primary holds the name apart from the others that
    /// share its file here): then it lands in a file of its own.
    #[test]
    fn a_file_sent_apart_lands_in_a_file_of_its_own_over_names_joined_here() {
        use std::io::Write;
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let body = b"the message";
        let hash = index::hash_bytes(body);
        for apart in [false, true] {
            let (_tmp, dir, internal) = store_with(&[("cur/a", "the message")]);
            std::fs::create_dir_all(dir.join("new")).unwrap();
            std::fs::hard_link(dir.join("cur/a"), dir.join("new/b")).unwrap();
            let on_disk = std::fs::metadata(dir.join("cur/a")).unwrap();
            let m = Meta {
                mode: on_disk.mode() & 0o7777,
                uid: on_disk.uid(),
                gid: on_disk.gid(),
                mtime_sec: on_disk.mtime(),
                mtime_nsec: on_disk.mtime_nsec() as u32,
            };
            let mut root = Root::open(&dir, &internal).unwrap();
            let mut index = Index::in_memory();
            let mut r = Applier::new(Arc::new(ReplStats::default()));
            let fd = root.create_staged(1).unwrap();
            let mut f = std::fs::File::from(fd);
            f.write_all(body).unwrap();
            let fd = std::os::fd::OwnedFd::from(f);
            root.finish_staged(&fd, &m).unwrap();
            let staged = index::fstat(fd.as_fd()).unwrap();
            drop(fd);
            let rel = PathBuf::from("new/b");
            r.land(
                &mut root,
                &mut index,
                0,
                1,
                rel,
                hash,
                11,
                apart,
                Ok(staged),
            );
            assert_eq!(r.take_replies().count(), 0, "apart: {apart}");
            let (a, b) = (
                std::fs::metadata(dir.join("cur/a")).unwrap(),
                std::fs::metadata(dir.join("new/b")).unwrap(),
            );
            assert_eq!(std::fs::read(dir.join("new/b")).unwrap(), body);
            assert_eq!((b.mode() & 0o7777, b.mtime()), (m.mode, m.mtime_sec));
            if apart {
                assert_ne!(a.ino(), b.ino(), "landed in a file of its own");
                assert_eq!((a.nlink(), b.nlink()), (1, 1));
            } else {
                assert_eq!(a.ino(), b.ino(), "the link stays a link");
                assert_eq!(a.nlink(), 2);
            }
        }
    }

    /// A store root holding `files` (path, content), and where its internal
    /// directory goes.
    /// The delete of a message's old name waits while its content waits
    /// for room under the new name (a rename the primary sends as a copy
    /// and a delete): answered `NoSpace`, the file stays. A delete of
    /// other content goes on; once the new name is said again (its file
    /// arrives, or the primary deletes it), the delete goes on too.
    /// A rename onto the only copy here of content that waits under
    /// another name is held as a delete of it would be: for room, then
    /// for the content's resend; once the primary says something else of
    /// that name, the rename goes on (simulator seed 27621).
    #[test]
    fn a_rename_onto_the_only_copy_of_waiting_content_is_held() {
        let (_tmp, dir, mut root, mut index, mut r) = message_and_another();
        let body = b"the message";
        let (m, other) = (Path::new("new/m"), Path::new("cur/m:2,S"));
        let rename = || PathOp::Rename {
            from: PathBuf::from("cur/x"),
            to: m.to_path_buf(),
        };
        r.no_room(0, 1, other, index::hash_bytes(body), body.len() as u64);
        r.apply(&mut root, &mut index, 0, 2, rename());
        let replies: Vec<Reply> = r.take_replies().collect();
        assert!(
            matches!(&replies[..], [Reply::HeldForRoom { seq: 2, rel, .. }] if rel == m),
            "{replies:?}"
        );
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), body);
        assert!(dir.join("cur/x").exists());
        // Room for it: held while its resend is awaited.
        r.room(0, body.len() as u64);
        r.apply(&mut root, &mut index, 0, 3, rename());
        let replies: Vec<Reply> = r.take_replies().collect();
        assert!(
            matches!(&replies[..], [Reply::HeldForResend { seq: 3, rel, .. }] if rel == m),
            "{replies:?}"
        );
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), body);
        // The primary deletes the other name: nothing waits, the rename
        // replaces the file.
        r.apply(
            &mut root,
            &mut index,
            0,
            4,
            PathOp::Delete {
                unsure: false,
                rel: other.to_path_buf(),
            },
        );
        r.apply(&mut root, &mut index, 0, 5, rename());
        assert!(r.take_replies().next().is_none());
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), b"another message");
        assert!(!dir.join("cur/x").exists());
    }

    /// The source of a rename held for room is the only copy here of what
    /// the primary holds at the target (a message renamed onto another
    /// message's name): the primary's delete of it, even sure, waits as
    /// for a rename that failed, and goes once the target lands with it
    /// (simulator seed 39462).
    #[test]
    fn the_source_of_a_rename_held_for_room_stays_until_its_target_lands() {
        let (_tmp, dir, mut root, mut index, mut r) = message_and_another();
        let body = b"the message";
        let (m, x) = (Path::new("new/m"), Path::new("cur/x"));
        r.no_room(0, 1, Path::new("cur/m:2,S"), index::hash_bytes(body), 11);
        let rename = PathOp::Rename {
            from: x.to_path_buf(),
            to: m.to_path_buf(),
        };
        r.apply(&mut root, &mut index, 0, 2, rename);
        assert!(
            matches!(
                r.take_replies().next(),
                Some(Reply::HeldForRoom { seq: 2, .. })
            ),
            "the rename is held"
        );
        let delete_x = || PathOp::Delete {
            unsure: false,
            rel: x.to_path_buf(),
        };
        r.apply(&mut root, &mut index, 0, 3, delete_x());
        let replies: Vec<Reply> = r.take_replies().collect();
        assert!(
            matches!(&replies[..], [Reply::HeldForRename { seq: 3, rel, .. }] if rel == x),
            "{replies:?}"
        );
        assert_eq!(std::fs::read(dir.join(x)).unwrap(), b"another message");
        // The other name expunged meanwhile, the target lands (here as a
        // link the primary made): the source's delete goes on.
        r.apply(
            &mut root,
            &mut index,
            0,
            4,
            PathOp::Delete {
                unsure: false,
                rel: PathBuf::from("cur/m:2,S"),
            },
        );
        let link = PathOp::Link {
            existing: x.to_path_buf(),
            rel: m.to_path_buf(),
            hash: index::hash_bytes(b"another message"),
            meta: times_of(&dir.join(x)),
        };
        r.apply(&mut root, &mut index, 0, 5, link);
        assert!(r.take_replies().next().is_none());
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), b"another message");
        assert!(!dir.join(x).exists(), "the source, asked for, goes with it");
        r.apply(&mut root, &mut index, 0, 6, delete_x());
        assert!(r.take_replies().next().is_none());
    }

    #[test]
    fn a_link_symlink_folder_or_landing_over_the_only_copy_of_waiting_content_is_held() {
        let (_tmp, dir, internal) = store_with(&[
            ("new/m", "the message"),
            ("box/cur/m2", "the other message"),
            ("cur/x", "another message"),
        ]);
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let mut r = Applier::new(Arc::new(ReplStats::default()));
        let (body, body2) = (&b"the message"[..], &b"the other message"[..]);
        // Both messages were copied under other names, refused for room.
        r.no_room(0, 1, Path::new("cur/m:2,S"), index::hash_bytes(body), 11);
        r.no_room(0, 2, Path::new("cur/m2:2,S"), index::hash_bytes(body2), 17);
        let held_at = |r: &mut Applier| -> Vec<(u64, PathBuf)> {
            r.take_replies()
                .map(|x| match x {
                    Reply::HeldForRoom { seq, rel, .. } => (seq, rel),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let x = "cur/x";
        let meta = times_of(&dir.join(x));
        let another = index::hash_bytes(b"another message");
        let ops = [
            PathOp::Link {
                existing: x.into(),
                rel: "new/m".into(),
                hash: another,
                meta,
            },
            PathOp::Symlink {
                rel: "new/m".into(),
                target: b"../cur/x".to_vec(),
                meta,
            },
            PathOp::Mkdir {
                rel: "new/m".into(),
                meta,
            },
            // A file renamed onto a folder that holds the other message,
            // a symlink made there.
            PathOp::Rename {
                from: x.into(),
                to: "box".into(),
            },
            PathOp::Symlink {
                rel: "box".into(),
                target: b"cur/x".to_vec(),
                meta,
            },
        ];
        for (seq, op) in (10..).zip(ops) {
            let at = match &op {
                PathOp::Rename { to, .. } => to.clone(),
                PathOp::Link { rel, .. }
                | PathOp::Symlink { rel, .. }
                | PathOp::Mkdir { rel, .. } => rel.clone(),
                _ => unreachable!(),
            };
            r.apply(&mut root, &mut index, 0, seq, op);
            assert_eq!(held_at(&mut r), [(seq, at)]);
        }
        // A file landing over that folder.
        r.land(
            &mut root,
            &mut index,
            0,
            20,
            "box".into(),
            another,
            15,
            true,
            Ok(None),
        );
        assert_eq!(held_at(&mut r), [(20, PathBuf::from("box"))]);
        assert_eq!(std::fs::read(dir.join("new/m")).unwrap(), body);
        assert_eq!(std::fs::read(dir.join("box/cur/m2")).unwrap(), body2);
        assert_eq!(std::fs::read(dir.join(x)).unwrap(), b"another message");
        // A link of the file's own content loses nothing: not held.
        std::fs::write(dir.join("cur/y"), body).unwrap();
        r.apply(
            &mut root,
            &mut index,
            0,
            30,
            PathOp::Link {
                existing: "cur/y".into(),
                rel: "new/m".into(),
                hash: index::hash_bytes(body),
                meta: times_of(&dir.join("cur/y")),
            },
        );
        assert!(r.take_replies().next().is_none());
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join("new/m")).unwrap()),
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join("cur/y")).unwrap())
        );
    }

    #[test]
    fn a_delete_waits_while_its_content_waits_for_room_under_another_name() {
        let (_tmp, dir, internal) = store_with(&[
            ("new/m", "the message, moved to cur"),
            ("new/o", "another message"),
        ]);
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let stats = Arc::new(ReplStats::default());
        let mut r = Applier::new(stats.clone());
        let needs = |r: &mut Applier| -> Vec<(u64, PathBuf, NeedReason)> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::Need {
                        seq, rel, reason, ..
                    } => Some((seq, rel, reason)),
                    Reply::HeldForRoom { seq, rel, .. } => Some((seq, rel, NeedReason::NoSpace)),
                    _ => None,
                })
                .collect()
        };
        let body = b"the message, moved to cur";
        let (m, moved) = (Path::new("new/m"), Path::new("cur/m:2,S"));
        let delete = |rel: &Path| PathOp::Delete {
            unsure: false,
            rel: rel.to_path_buf(),
        };
        // The copy under the new name found no room.
        r.no_room(0, 1, moved, index::hash_bytes(body), body.len() as u64);
        r.apply(&mut root, &mut index, 0, 2, delete(m));
        assert_eq!(needs(&mut r), [(2, m.to_path_buf(), NeedReason::NoSpace)]);
        assert_eq!(std::fs::read(dir.join(m)).unwrap(), body);
        assert_eq!(
            stats
                .deletes_held_for_room
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Other content is not held.
        r.apply(&mut root, &mut index, 0, 3, delete(Path::new("new/o")));
        assert!(needs(&mut r).is_empty());
        assert!(!dir.join("new/o").exists());
        // Asked again, it still waits, in the next session too; once the
        // store has room for it, the delete goes on (the new name, sent
        // again, lands or waits again).
        r.apply(&mut root, &mut index, 0, 4, delete(m));
        assert_eq!(needs(&mut r).len(), 1);
        let mut r = r.next_receiver();
        r.apply(&mut root, &mut index, 0, 1, delete(m));
        assert_eq!(needs(&mut r).len(), 1);
        r.room(0, body.len() as u64 - 1);
        r.apply(&mut root, &mut index, 0, 2, delete(m));
        assert_eq!(needs(&mut r).len(), 1, "no room for it yet");
        // Once the store has room for it, it is awaited under its name (the
        // primary sends it again within seconds): the delete is still held,
        // asked for again without a word of room, a bounded number of
        // times (simulator seed 19568: the original expunged meanwhile).
        r.room(0, body.len() as u64);
        let held_for_resend = |r: &mut Applier, seq: u64| {
            let replies: Vec<Reply> = r.take_replies().collect();
            matches!(&replies[..], [Reply::HeldForResend { seq: s, rel, .. }] if *s == seq && rel == m)
        };
        for k in 0..u64::from(super::super::waiting::RESEND_HOLDS_MAX) {
            r.apply(&mut root, &mut index, 0, 100 + k, delete(m));
            assert!(held_for_resend(&mut r, 100 + k), "hold {k}");
            assert!(dir.join(m).exists());
        }
        r.apply(&mut root, &mut index, 0, 6, delete(m));
        assert!(needs(&mut r).is_empty());
        assert!(!dir.join(m).exists(), "the holds ran out");
        // Its content landing under any name lets the old name go (here
        // a link the primary made to it).
        std::fs::write(dir.join(m), body).unwrap();
        r.no_room(0, 7, moved, index::hash_bytes(body), body.len() as u64);
        r.apply(&mut root, &mut index, 0, 8, delete(m));
        assert_eq!(needs(&mut r).len(), 1);
        let linked = times_of(&dir.join(m));
        r.link(
            &mut root,
            &mut index,
            0,
            9,
            m,
            PathBuf::from("new/m2"),
            index::hash_bytes(body),
            &linked,
        );
        std::fs::remove_file(dir.join("new/m2")).unwrap();
        r.apply(&mut root, &mut index, 0, 10, delete(m));
        assert!(needs(&mut r).is_empty());
        assert!(!dir.join(m).exists());
        // So does the primary deleting the new name (a delete of a
        // message's last name must free the disk).
        std::fs::write(dir.join(m), body).unwrap();
        r.no_room(0, 11, moved, index::hash_bytes(body), body.len() as u64);
        r.apply(&mut root, &mut index, 0, 12, delete(moved));
        r.apply(&mut root, &mut index, 0, 13, delete(m));
        assert!(needs(&mut r).is_empty());
        assert!(!dir.join(m).exists());
        // The new name landing takes the held old name along at once, not
        // at the primary's next retry (a duplicate at a failover meanwhile).
        std::fs::write(dir.join(m), body).unwrap();
        std::fs::create_dir_all(dir.join("keep")).unwrap();
        std::fs::write(dir.join("keep/x"), body).unwrap();
        r.no_room(0, 14, moved, index::hash_bytes(body), body.len() as u64);
        r.apply(&mut root, &mut index, 0, 15, delete(m));
        assert_eq!(needs(&mut r).len(), 1);
        std::fs::create_dir_all(dir.join("cur")).unwrap();
        let kept = times_of(&dir.join("keep/x"));
        r.link(
            &mut root,
            &mut index,
            0,
            16,
            Path::new("keep/x"),
            moved.to_path_buf(),
            index::hash_bytes(body),
            &kept,
        );
        assert!(dir.join(moved).exists());
        assert!(
            !dir.join(m).exists(),
            "the held old name went with the landing"
        );
    }

    /// An unsure delete (the primary found the name gone, maybe moved to a
    /// name still on its way) holds the replica's only copy of a message,
    /// answered `MayHaveMoved`, until the same message (content and
    /// Maildir base name) lands under another name (the held name then
    /// goes at once) or a sure delete comes; a folder with anything in it
    /// is held until the sure delete; an empty folder, a file with other
    /// links and a missing name are not held, a name replaced by a rename
    /// is held no more, and the next session's receiver holds none.
    #[test]
    fn an_unsure_delete_holds_the_only_copy_until_its_content_lands_elsewhere() {
        let body = "a message moved to cur, its new name on its way";
        let (_tmp, dir, internal) = store_with(&[
            ("new/m", body),
            ("new/n", "expunged for real"),
            ("new/p", "moved while the replica reconnected"),
            ("new/q", "replaced by a rename"),
            ("new/q2", "renamed onto q"),
            ("new/l", "a message with two names"),
            ("keep/x", body),
            ("keep/y", "moved while the replica reconnected"),
            ("sub/f", "in a folder that went"),
        ]);
        std::fs::hard_link(dir.join("new/l"), dir.join("new/l2")).unwrap();
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let stats = Arc::new(ReplStats::default());
        let mut r = Applier::new(stats.clone());
        let delete = |rel: &str, unsure: bool| PathOp::Delete {
            rel: rel.into(),
            unsure,
        };
        let held = |r: &mut Applier| -> Vec<PathBuf> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::Need {
                        rel,
                        reason: NeedReason::MayHaveMoved,
                        ..
                    } => Some(rel),
                    _ => None,
                })
                .collect()
        };
        // The primary's link of `existing` (holding `body`) at `to`: a landing.
        fn land(
            r: &mut Applier,
            (root, index): (&mut Root, &mut Index),
            dir: &Path,
            seq: u64,
            existing: &str,
            to: &str,
            body: &[u8],
        ) {
            let meta = times_of(&dir.join(existing));
            let hash = index::hash_bytes(body);
            r.link(
                root,
                index,
                0,
                seq,
                Path::new(existing),
                to.into(),
                hash,
                &meta,
            );
        }
        r.apply(&mut root, &mut index, 0, 1, delete("new/m", true));
        assert_eq!(held(&mut r), [PathBuf::from("new/m")]);
        assert!(dir.join("new/m").exists());
        assert_eq!(
            stats
                .deletes_held_for_move
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Not held: an empty folder, a file with another name, a name not
        // here.
        std::fs::create_dir(dir.join("empty")).unwrap();
        for gone in ["empty", "new/l", "new/absent"] {
            r.apply(&mut root, &mut index, 0, 2, delete(gone, true));
            assert!(held(&mut r).is_empty(), "{gone} is not held");
            assert!(!dir.join(gone).exists(), "{gone} is deleted");
        }
        assert!(dir.join("new/l2").exists());
        // A folder with something in it is held until the sure delete.
        r.apply(&mut root, &mut index, 0, 2, delete("sub", true));
        assert_eq!(held(&mut r), [PathBuf::from("sub")]);
        assert!(dir.join("sub/f").exists());
        r.apply(&mut root, &mut index, 0, 2, delete("sub", false));
        assert!(held(&mut r).is_empty());
        assert!(!dir.join("sub").exists());
        // The content lands under its new name (a link the primary made to
        // another copy of the bytes): the held name goes at once.
        let moved = Path::new("cur/m:2,S");
        std::fs::create_dir(dir.join("cur")).unwrap();
        land(
            &mut r,
            (&mut root, &mut index),
            &dir,
            3,
            "keep/x",
            "cur/m:2,S",
            body.as_bytes(),
        );
        assert!(dir.join(moved).exists());
        assert!(!dir.join("new/m").exists(), "gone once its content landed");
        assert!(!r.waiting.holds_for_move(0, Path::new("new/m")));
        // A message that landed under its folder's old name, the folder
        // renamed since: that landing is no copy elsewhere, so it is held.
        std::fs::create_dir_all(dir.join("f1/new")).unwrap();
        std::fs::write(dir.join("keep/w"), body).unwrap();
        land(
            &mut r,
            (&mut root, &mut index),
            &dir,
            3,
            "keep/w",
            "f1/new/m",
            body.as_bytes(),
        );
        std::fs::remove_file(dir.join("keep/w")).unwrap();
        r.apply(
            &mut root,
            &mut index,
            0,
            3,
            PathOp::Rename {
                from: "f1".into(),
                to: "f2".into(),
            },
        );
        let _ = r.take_replies().count();
        r.apply(&mut root, &mut index, 0, 3, delete("f2/new/m", true));
        assert_eq!(held(&mut r), [PathBuf::from("f2/new/m")]);
        r.apply(&mut root, &mut index, 0, 3, delete("f2/new/m", false));
        // A real expunge: held, then the primary's sure delete after its
        // queue's turn.
        r.apply(&mut root, &mut index, 0, 4, delete("new/n", true));
        assert_eq!(held(&mut r), [PathBuf::from("new/n")]);
        r.apply(&mut root, &mut index, 0, 5, delete("new/n", false));
        assert!(held(&mut r).is_empty());
        assert!(!dir.join("new/n").exists());
        // A name replaced by a rename is held no more.
        r.apply(&mut root, &mut index, 0, 6, delete("new/q", true));
        assert_eq!(held(&mut r), [PathBuf::from("new/q")]);
        r.apply(
            &mut root,
            &mut index,
            0,
            7,
            PathOp::Rename {
                from: "new/q2".into(),
                to: "new/q".into(),
            },
        );
        assert!(!r.waiting.holds_for_move(0, Path::new("new/q")));
        // The next connection's receiver holds none (the primary's retry
        // went with the session): the file stays until the next session
        // deletes it again, unsure, and holds it again.
        r.apply(&mut root, &mut index, 0, 8, delete("new/p", true));
        assert_eq!(held(&mut r), [PathBuf::from("new/p")]);
        let mut r = r.next_receiver();
        assert!(!r.waiting.holds_for_move(0, Path::new("new/p")));
        assert!(dir.join("new/p").exists());
        r.apply(&mut root, &mut index, 0, 1, delete("new/p", true));
        assert_eq!(held(&mut r), [PathBuf::from("new/p")]);
        // A copy of the bytes under another message's name does not let
        // it go; the message under its new name does.
        std::fs::write(dir.join("keep/z"), "moved while the replica reconnected").unwrap();
        land(
            &mut r,
            (&mut root, &mut index),
            &dir,
            2,
            "keep/z",
            "cur/copy",
            b"moved while the replica reconnected",
        );
        assert!(dir.join("cur/copy").exists());
        assert!(dir.join("new/p").exists(), "a copy does not let it go");
        land(
            &mut r,
            (&mut root, &mut index),
            &dir,
            3,
            "keep/y",
            "cur/p:2,S",
            b"moved while the replica reconnected",
        );
        assert!(!dir.join("new/p").exists());
        assert!(dir.join("cur/p:2,S").exists());
    }

    /// A rename the replica could not apply (here its target's folder is a
    /// file) leaves the source as the only copy of what the primary holds
    /// at the target. The primary deletes the source next and sends the
    /// target again: that delete is held (answered as a local error, so the
    /// primary retries it) until the target lands, whatever the room or
    /// where else the same bytes are; once the target lands, the source
    /// asked for goes with it. At most [`RENAME_HOLDS_MAX`] times, for a
    /// primary that never sends the target again (the message deleted
    /// there meanwhile).
    #[test]
    fn a_delete_waits_for_the_target_of_a_rename_that_failed_here() {
        use super::super::waiting::RENAME_HOLDS_MAX;
        let body = "the message, flagged";
        let (_tmp, dir, internal) = store_with(&[
            ("new/m", body),
            ("new/twin", body),
            ("new/n", "another, flagged and then expunged"),
            ("cur", "a file where the folder goes"),
        ]);
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let mut r = Applier::new(Arc::new(ReplStats::default()));
        let (m, to) = (Path::new("new/m"), Path::new("cur/m:2,S"));
        let rename = |from: &Path, to: &Path| PathOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        };
        let delete = |rel: &Path| PathOp::Delete {
            unsure: false,
            rel: rel.to_path_buf(),
        };
        let held = |r: &mut Applier| -> Vec<PathBuf> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::HeldForRename { rel, .. } => Some(rel),
                    _ => None,
                })
                .collect()
        };
        r.apply(&mut root, &mut index, 0, 1, rename(m, to));
        assert!(
            r.take_replies()
                .any(|x| matches!(x, Reply::Failed { rel, .. } if rel == to)),
            "the rename failed"
        );
        // A byte-identical message elsewhere is not the source: expunged,
        // it goes.
        r.apply(&mut root, &mut index, 0, 2, delete(Path::new("new/twin")));
        assert!(held(&mut r).is_empty());
        assert!(!dir.join("new/twin").exists());
        r.apply(&mut root, &mut index, 0, 3, delete(m));
        assert_eq!(held(&mut r), [m]);
        assert!(dir.join(m).exists());
        // Room does not let it go (the rename did not fail for room), nor
        // the same bytes landing under another name; the next session
        // holds it too.
        r.room(0, u64::MAX);
        let meta = times_of(&dir.join(m));
        let hash = index::hash_bytes(body.as_bytes());
        r.link(
            &mut root,
            &mut index,
            0,
            4,
            m,
            PathBuf::from("new/copy"),
            hash,
            &meta,
        );
        let mut r = r.next_receiver();
        r.apply(&mut root, &mut index, 0, 1, delete(m));
        assert_eq!(held(&mut r), [m]);
        // The target lands (here as a link the primary made): the source,
        // whose delete was asked for, goes with it at once.
        std::fs::remove_file(dir.join("cur")).unwrap();
        std::fs::create_dir(dir.join("cur")).unwrap();
        r.link(
            &mut root,
            &mut index,
            0,
            2,
            m,
            to.to_path_buf(),
            hash,
            &meta,
        );
        assert!(
            !dir.join(m).exists(),
            "the source stays until the next retry"
        );
        assert_eq!(std::fs::read(dir.join(to)).unwrap(), body.as_bytes());
        r.apply(&mut root, &mut index, 0, 3, delete(m));
        assert!(held(&mut r).is_empty());
        // A target that never comes: held a bounded number of times.
        std::fs::remove_dir_all(dir.join("cur")).unwrap();
        std::fs::write(dir.join("cur"), "a file again").unwrap();
        let n = Path::new("new/n");
        r.apply(
            &mut root,
            &mut index,
            0,
            4,
            rename(n, Path::new("cur/n:2,S")),
        );
        r.take_replies().for_each(drop);
        for i in 0..RENAME_HOLDS_MAX {
            r.apply(&mut root, &mut index, 0, 5 + i as u64, delete(n));
            assert_eq!(held(&mut r), [n], "hold {i}");
        }
        r.apply(&mut root, &mut index, 0, 100, delete(n));
        assert!(held(&mut r).is_empty());
        assert!(!dir.join(n).exists());
        // The primary deleting the target ends the hold too.
        std::fs::write(dir.join(n), "again").unwrap();
        r.apply(
            &mut root,
            &mut index,
            0,
            101,
            rename(n, Path::new("cur/n:2,S")),
        );
        r.take_replies().for_each(drop);
        r.apply(
            &mut root,
            &mut index,
            0,
            102,
            delete(Path::new("cur/n:2,S")),
        );
        r.apply(&mut root, &mut index, 0, 103, delete(n));
        assert!(held(&mut r).is_empty());
        assert!(!dir.join(n).exists());
    }

    /// Before a delete, the staged files land that could be the new name of
    /// what it removes: the one with the removed file's content, or, for a
    /// folder, every one (a message moved out of a folder that is then
    /// deleted: the folder's delete applied while the new name was staged,
    /// and a cut then discarded the staged file, left the message on
    /// neither name; found by the simulator, seed 2871).
    #[test]
    fn a_delete_lands_first_what_could_be_the_new_name_of_what_it_removes() {
        struct S(PathBuf, u128);
        impl StagedAt for S {
            fn store(&self) -> usize {
                0
            }
            fn rel(&self) -> &Path {
                &self.0
            }
            fn hash(&self) -> u128 {
                self.1
            }
            fn size(&self) -> u64 {
                1
            }
        }
        let del = SyncMsg::Delete {
            seq: 1,
            store: 0,
            path: b"old".to_vec(),
            unsure: false,
        };
        let moved = S(PathBuf::from("new/cur/m"), 7);
        let lands = |gone: Gone| match land_first::<S>(&del, gone) {
            Before::All => true,
            Before::Touching(f) => f(&moved),
            Before::Nothing => false,
        };
        assert!(lands(Gone::Folder));
        assert!(lands(Gone::Content(7)));
        assert!(!lands(Gone::Content(8)));
        assert!(!lands(Gone::Nothing));
        // A staged file under the deleted name lands first whatever it is.
        let under = S(PathBuf::from("old/x"), 9);
        assert!(matches!(land_first::<S>(&del, Gone::Nothing), Before::Touching(f) if f(&under)));
    }

    /// A folder's delete waits as the delete of a file in it would: for a
    /// copy of that file's content refused for want of room under another
    /// name (a message copied to another folder on a full disk, then its
    /// first folder deleted), and for a failed rename's source in it (a
    /// message flagged, the rename failing here, then its folder deleted).
    /// Without the wait, the message was on neither name here.
    #[test]
    fn a_folders_delete_waits_for_a_message_in_it_that_has_no_other_name_here() {
        use super::super::waiting::RENAME_HOLDS_MAX;
        let body = "the message, copied to another folder";
        let (_tmp, dir, internal) = store_with(&[
            (".Sent/cur/m", body),
            (".Sent/cur/other", "another message"),
            (".F/new/n", "flagged, then its folder deleted"),
            ("file", "a file where the rename's folder goes"),
        ]);
        let mut root = Root::open(&dir, &internal).unwrap();
        let mut index = Index::in_memory();
        let mut r = Applier::new(Arc::new(ReplStats::default()));
        let hash = index::hash_bytes(body.as_bytes());
        let m = Path::new(".Sent/cur/m");
        let st = root.lstat(m).unwrap().unwrap();
        index.set(m.to_path_buf(), index::Entry::new(&st, hash, true));
        let delete = |rel: &str| PathOp::Delete {
            rel: rel.into(),
            unsure: false,
        };
        let replies = |r: &mut Applier| -> Vec<String> {
            r.take_replies()
                .map(|x| match x {
                    Reply::HeldForRoom { rel, .. } => format!("room {}", rel.display()),
                    Reply::HeldForRename { rel, .. } => format!("rename {}", rel.display()),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        // The copy found no room; the folder of the original is deleted.
        r.no_room(0, 1, Path::new("cur/copy"), hash, body.len() as u64);
        r.apply(&mut root, &mut index, 0, 2, delete(".Sent"));
        assert_eq!(replies(&mut r), ["room .Sent"]);
        assert_eq!(std::fs::read_to_string(dir.join(m)).unwrap(), body);
        // Room for it: the folder goes (the copy, sent again, lands or
        // waits again).
        r.room(0, u64::MAX);
        r.apply(&mut root, &mut index, 0, 3, delete(".Sent"));
        assert!(replies(&mut r).is_empty());
        assert!(!dir.join(".Sent").exists());
        // No room coming: a folder may be the room the copy waits for, so
        // its delete is held for a bounded number of space rechecks (found
        // on the disk: the index need not know the file).
        std::fs::create_dir_all(dir.join(".Sent/cur")).unwrap();
        std::fs::write(dir.join(m), body).unwrap();
        index.remove_tree(Path::new(".Sent"));
        r.no_room(0, 3, Path::new("cur/copy"), hash, body.len() as u64);
        for i in 0..super::super::waiting::FOLDER_ROOM_HOLD_RECHECKS {
            r.apply(&mut root, &mut index, 0, 4, delete(".Sent"));
            assert_eq!(replies(&mut r), ["room .Sent"], "recheck {i}");
            r.room(0, 0);
        }
        r.apply(&mut root, &mut index, 0, 4, delete(".Sent"));
        assert!(replies(&mut r).is_empty());
        assert!(!dir.join(".Sent").exists());
        // A flag rename that fails here (its target's folder is a file).
        r.apply(
            &mut root,
            &mut index,
            0,
            4,
            PathOp::Rename {
                from: ".F/new/n".into(),
                to: "file/n:2,S".into(),
            },
        );
        r.take_replies().for_each(drop);
        for i in 0..RENAME_HOLDS_MAX {
            r.apply(&mut root, &mut index, 0, 5 + u64::from(i), delete(".F"));
            assert_eq!(replies(&mut r), ["rename .F"], "hold {i}");
        }
        assert!(dir.join(".F/new/n").exists());
        // A target that never comes: the holds run out.
        r.apply(&mut root, &mut index, 0, 100, delete(".F"));
        assert!(replies(&mut r).is_empty());
        assert!(!dir.join(".F").exists());
    }

    /// Folders renamed away and back (`a` to `b`, then `b` to `a`) while a
    /// conflict in `b` cannot be kept aside hold each other's renames: a
    /// later op in either is answered `NoSpace` while there is no room,
    /// and goes on once there is, rather than being refused for a chain
    /// of holds that never ends.
    #[test]
    fn folders_renamed_away_and_back_onto_a_conflict_release_each_other() {
        let (_tmp, dir, internal, mut root, mut index, mut r) =
            conflicts_cannot_be_kept(&[("a/cur/m", "the message"), ("b/cur/x", "genuine")]);
        let needs = |r: &mut Applier| -> Vec<(u64, NeedReason)> {
            r.take_replies()
                .filter_map(|x| match x {
                    Reply::Need { seq, reason, .. } => Some((seq, reason)),
                    _ => None,
                })
                .collect()
        };
        let (a, b) = (Path::new("a"), Path::new("b"));
        r.keep_aside(&mut root, 0, 1, PathBuf::from("b/cur/x"));
        assert!(r.is_protected(0, Path::new("b/cur/x")));
        r.rename(&mut root, &mut index, 0, 2, a, b);
        r.rename(&mut root, &mut index, 0, 3, b, a);
        assert_eq!(needs(&mut r).len(), 2);
        assert_eq!(r.held_for_rename().len(), 2);
        let m = Path::new("a/cur/m");
        r.delete(&mut root, &mut index, 0, 4, m);
        assert_eq!(needs(&mut r).len(), 1);
        // Nothing let go of while the chain is not released.
        assert_eq!(r.held_for_rename().len(), 2);
        // Room again: the conflict goes aside, both holds go, and so does
        // the message the primary deleted.
        let mut root = Root::open(&dir, &internal).unwrap();
        r.delete(&mut root, &mut index, 0, 5, m);
        let replies: Vec<Reply> = r.take_replies().collect();
        assert!(
            matches!(&replies[..], [Reply::KeptAside { rel, .. }] if rel == Path::new("b/cur/x")),
            "{replies:?}"
        );
        assert!(r.held_for_rename().is_empty());
        assert!(!dir.join(m).exists());
    }

    /// A store holding `files` whose conflicts folder cannot be made (a
    /// genuine conflict there cannot be kept aside), and an applier over
    /// it.
    fn conflicts_cannot_be_kept(
        files: &[(&str, &str)],
    ) -> (tempfile::TempDir, PathBuf, PathBuf, Root, Index, Applier) {
        let (tmp, dir, internal) = store_with(files);
        let root = Root::open(&dir, &internal).unwrap();
        std::fs::remove_dir_all(internal.join(super::super::fsops::CONFLICTS_DIR)).unwrap();
        let r = Applier::new(Arc::new(ReplStats::default()));
        (tmp, dir, internal, root, Index::in_memory(), r)
    }

    /// A store holding "the message" at `new/m` and "another message" at
    /// `cur/x`, and an applier over it.
    fn message_and_another() -> (tempfile::TempDir, PathBuf, Root, Index, Applier) {
        let (tmp, dir, internal) =
            store_with(&[("new/m", "the message"), ("cur/x", "another message")]);
        let root = Root::open(&dir, &internal).unwrap();
        let r = Applier::new(Arc::new(ReplStats::default()));
        (tmp, dir, root, Index::in_memory(), r)
    }

    fn store_with(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("root");
        for (p, body) in files {
            std::fs::create_dir_all(dir.join(p).parent().unwrap()).unwrap();
            std::fs::write(dir.join(p), body).unwrap();
        }
        let internal = tmp.path().join("internal");
        (tmp, dir, internal)
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_folder_renamed_over_a_former_name_takes_its_own_mtimes_not_the_former_folders() {
        let mut r = Applier::new(Arc::new(ReplStats::default()));
        let k = |p: &str| (0usize, PathBuf::from(p));
        // `.B` was a folder once (renamed away since); `.A` and its `cur`.
        r.dir_times.insert(k("m/.B"), meta(1));
        r.dir_times.insert(k("m/.B/cur"), meta(2));
        r.dir_times.insert(k("m/.A"), meta(3));
        r.dir_times.insert(k("m/.A/cur"), meta(4));
        r.dir_times.insert(k("m/.AX"), meta(5));
        r.retime.insert(k("m/.A/cur"));
        r.retime.insert(k("m/.B"));
        r.move_dir_times(0, Path::new("m/.A"), Path::new("m/.B"));
        assert_eq!(r.dir_times.get(&k("m/.B")), Some(&meta(3)));
        assert_eq!(r.dir_times.get(&k("m/.B/cur")), Some(&meta(4)));
        assert!(!r.dir_times.contains_key(&k("m/.A")));
        assert!(!r.dir_times.contains_key(&k("m/.A/cur")));
        assert_eq!(
            r.dir_times.get(&k("m/.AX")),
            Some(&meta(5)),
            "a sibling stays"
        );
        assert_eq!(
            r.retime.iter().cloned().collect::<Vec<_>>(),
            [k("m/.B/cur")],
            "the former .B's pending retime is gone, .A/cur's moved"
        );
    }
}
