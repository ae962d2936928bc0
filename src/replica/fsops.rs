//! Receiver-side filesystem layer: every write the secondary makes inside a
//! mailstore root goes through here, and nothing can escape the root.
//!
//! The rule that makes this safe: a peer-supplied path is never handed to a
//! path-walking syscall as a whole. Its parent directory is opened relative
//! to the root fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and
//! the final step is an `*at` call on that parent fd with a single component,
//! so the final component is never followed either. A symlink anywhere in the
//! parent chain is a refusal, not an error: the peer (or a local user) put it
//! there, and following it could write outside the mailstore.
//!
//! Durability is the caller's to group: it stages files, fsyncs them (here or
//! through its own io_uring), lands them, then fsyncs the directories the
//! methods returned. Two exceptions are done here because they are rare and
//! the caller cannot see them: directories created on the way to a path, and
//! moves into the conflicts area.
//!
//! One `Root` per mailstore per process: `Root::open` empties the staging
//! directory, which would discard another live `Root`'s staged files.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;

#[cfg(test)]
#[path = "fsops_tests.rs"]
mod tests;

/// Where older releases kept staging and conflicts, inside the root (a
/// Maildir++ root takes it for an IMAP folder named "hasync"): migrated
/// out by [`Root::open`].
pub const LEGACY_INTERNAL_DIR: &str = ".hasync";
/// Staged (not yet landed) files, in the store's internal directory.
pub const STAGING_DIR: &str = "staging";
/// Losers of conflicts, kept aside, in the store's internal directory.
pub const CONFLICTS_DIR: &str = "conflicts";

/// Longest relative path a peer may send: what one `*at` call below the
/// root's descriptor takes.
const PATH_BYTES_MAX: usize = super::tree::REL_PATH_BYTES_MAX;
/// Longest single component (Linux `NAME_MAX`).
const NAME_BYTES_MAX: usize = 255;
/// `openat2` with `RESOLVE_BENEATH` may answer EAGAIN when a rename races
/// the lookup; retry a few times, then report it.
const OPENAT2_TRIES_MAX: usize = 8;
/// Attempts at finding a free temporary or conflict-slot name.
const NAME_TRIES_MAX: u64 = 1000;
/// Staged files unnamed at most at once in this process, over every store
/// (see [`Root::create_staged`]): the receiver stages at most 2,048 files
/// ahead of its flushes, plus those being flushed. Also at most a quarter
/// of the descriptors the process may open.
pub const UNNAMED_STAGED_MAX: usize = 4096;
/// Unnamed staged files held by every [`Root`] of this process (each holds
/// a descriptor until it lands).
static UNNAMED_HELD: AtomicUsize = AtomicUsize::new(0);
/// Passes over a directory being removed, in case entries appear meanwhile.
const REMOVE_PASSES_MAX: usize = 4;

/// How every peer path is resolved: beneath the root, no symlinks at all.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);
/// Parent directories are opened as paths only: enough for every `*at` call.
const WALK_OFLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);
/// Directories we must fchmod/futimens/fsync/read need a real open.
const DIR_READ_OFLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

const TRAVERSES_SYMLINK: &str = "path traverses a symlink";

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The peer sent a path we must not touch. Names the path (lossy) and why.
    #[error("refused path {path:?}: {why}")]
    Refused { path: String, why: &'static str },
    /// Local I/O failed. Names the operation, the path and the errno.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// ENOSPC / EDQUOT: the disk is full; nothing was left behind.
    #[error("no space left while {op} {path}")]
    NoSpace { op: &'static str, path: String },
}

impl FsError {
    /// The peer asked for something we will not do (its fault, not ours).
    pub fn is_refusal(&self) -> bool {
        matches!(self, FsError::Refused { .. })
    }
    /// A refusal because the path runs through a symlink on this node
    /// (never followed).
    pub fn through_symlink(&self) -> bool {
        matches!(self, FsError::Refused { why, .. } if *why == TRAVERSES_SYMLINK)
    }
    /// The local disk or quota is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, FsError::NoSpace { .. })
    }
    /// An I/O error of `op` on `path`, as [`FsError::NoSpace`] if the disk
    /// or quota is full.
    pub fn from_io(op: &'static str, path: impl AsRef<Path>, e: std::io::Error) -> FsError {
        match e.raw_os_error() {
            Some(n) => fail(op, path, Errno::from_raw_os_error(n)),
            None => FsError::Io {
                op,
                path: path.as_ref().to_string_lossy().into_owned(),
                source: e,
            },
        }
    }
}

/// Metadata carried with every file/dir/symlink: the wire's own type.
pub use crate::wire::sync::Meta;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameOutcome {
    Renamed,
    SourceMissing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    Linked,
    SourceMissing,
}

fn refused(raw: &[u8], why: &'static str) -> FsError {
    FsError::Refused {
        path: String::from_utf8_lossy(raw).into_owned(),
        why,
    }
}

/// Maps an errno to our error, sorting out a full disk.
fn fail(op: &'static str, path: impl AsRef<Path>, e: Errno) -> FsError {
    let path = path.as_ref().to_string_lossy().into_owned();
    if e == Errno::NOSPC || e == Errno::DQUOT {
        FsError::NoSpace { op, path }
    } else {
        FsError::Io {
            op,
            path,
            source: e.into(),
        }
    }
}

/// Checks a relative path.
fn validate(raw: &[u8]) -> Result<(), &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw.len() > PATH_BYTES_MAX {
        return Err("path longer than 4095 bytes");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    if raw[0] == b'/' {
        return Err("absolute path");
    }
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" => return Err("empty path component"),
            b"." => return Err("`.` path component"),
            b".." => return Err("`..` path component"),
            c if c.len() > NAME_BYTES_MAX => return Err("path component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a peer-supplied relative path (bytes as received). Refuses: empty, absolute,
/// any `..` or `.` component, empty components (`a//b`), NUL bytes, a component > 255 bytes,
/// total > 4095 bytes.
pub fn check_rel(raw: &[u8]) -> Result<PathBuf, FsError> {
    validate(raw).map_err(|why| refused(raw, why))?;
    Ok(PathBuf::from(OsStr::from_bytes(raw)))
}

/// A validated relative path cut into its parent components and final name.
struct Split<'a> {
    raw: &'a [u8],
    /// Everything before the last `/` (empty at the root).
    parent: &'a [u8],
    comps: Vec<&'a [u8]>,
    name: &'a [u8],
}

impl<'a> Split<'a> {
    fn new(rel: &'a Path) -> Result<Split<'a>, FsError> {
        Split::parse(rel.as_os_str().as_bytes())
    }
    fn parse(raw: &'a [u8]) -> Result<Split<'a>, FsError> {
        validate(raw).map_err(|why| refused(raw, why))?;
        let (parent, name) = match raw.iter().rposition(|&b| b == b'/') {
            Some(i) => (&raw[..i], &raw[i + 1..]),
            None => (&raw[..0], raw),
        };
        let comps = if parent.is_empty() {
            Vec::new()
        } else {
            parent.split(|&b| b == b'/').collect()
        };
        Ok(Split {
            raw,
            parent,
            comps,
            name,
        })
    }
    fn path(&self) -> &'a Path {
        Path::new(OsStr::from_bytes(self.raw))
    }
    fn parent_path(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(self.parent))
    }
}

/// `a/b/c` → (`a/b`, `c`); a single component has `.` as its parent.
fn split_last(sub: &[u8]) -> (&[u8], &[u8]) {
    match sub.iter().rposition(|&b| b == b'/') {
        Some(i) => (&sub[..i], &sub[i + 1..]),
        None => (b".", sub),
    }
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn bytes_path(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// `openat2` with our resolve flags (beneath `base`, no symlink in any
/// component), retrying the EAGAIN a racing rename can cause.
pub(crate) fn open_beneath(
    base: BorrowedFd<'_>,
    rel: &[u8],
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(base, rel, oflags, Mode::empty(), RESOLVE) {
            Err(Errno::AGAIN) if tries + 1 < OPENAT2_TRIES_MAX => tries += 1,
            other => return other,
        }
    }
}

/// Whether `name` in `dir` is a symlink (not following it).
fn is_symlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    matches!(
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink
    )
}

fn timestamps(meta: &Meta) -> Timestamps {
    let t = Timespec {
        tv_sec: meta.mtime_sec,
        tv_nsec: i64::from(meta.mtime_nsec),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn perm(meta: &Meta) -> Mode {
    Mode::from_raw_mode(meta.mode & 0o7777)
}

/// A parent directory fd: the base itself (root-level names) or a new open.
enum DirFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl DirFd<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Borrowed(fd) => *fd,
            DirFd::Owned(fd) => fd.as_fd(),
        }
    }
}

/// An opened parent, and which of its components we had to create (indices
/// into the component list), so a failed operation can take them back.
struct Opened<'a> {
    dir: DirFd<'a>,
    created: Vec<usize>,
}

/// A mailstore's staged files. Unnamed ones (`O_TMPFILE`) never enter the
/// staging directory (no entry to add there and remove again), and a crash
/// leaves nothing of them behind; each keeps a descriptor of its own (apart
/// from the writer's) until it lands. Named ones are in the staging
/// directory under their id.
#[derive(Debug, Default)]
struct StagedIds {
    unnamed: std::collections::HashMap<u64, OwnedFd>,
    named: std::collections::HashSet<u64>,
}

const UNNAMED_UNKNOWN: u8 = 0;
const UNNAMED_WORKS: u8 = 1;
const UNNAMED_UNSUPPORTED: u8 = 2;

impl Drop for Root {
    fn drop(&mut self) {
        // Gives the process's places for unnamed files back.
        self.forget_staged();
    }
}

/// Where `keep_aside` put something, so it can be moved back if the
/// operation it made room for fails.
struct Aside {
    parent: OwnedFd,
    abs: PathBuf,
}

/// A mailstore root on the receiving side.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    /// hasync's own directory for this store: `staging/`, `conflicts/`.
    internal: PathBuf,
    fd: OwnedFd,
    staging: OwnedFd,
    conflicts: OwnedFd,
    owners: bool,
    /// Which metadata the peer may set (see [`check_meta`](Root::check_meta)).
    allow_special_modes: bool,
    /// Feeds temporary names and conflict slots.
    seq: AtomicU64,
    /// The staged files not landed yet, by id.
    staged: std::sync::Mutex<StagedIds>,
    /// Whether unnamed staged files work here ([`UNNAMED_UNKNOWN`] until
    /// the first is made).
    unnamed_works: AtomicU8,
    /// How many of this store's staged files may be unnamed at once
    /// (besides the process's [`UNNAMED_STAGED_MAX`]).
    unnamed_max: usize,
    /// The root for lookups (stat, hash, listing) below it.
    tree: super::tree::Tree,
}

/// Largest owner id a peer may set: ids from 2^31 up (-1, -2 and the
/// like as signed numbers) are overflow or "nobody" markers, not users.
pub const OWNER_ID_MAX: u32 = i32::MAX as u32;

/// Free space and inodes on a root's filesystem, for unprivileged writers
/// (what `df` and `df -i` call available).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    pub inodes: u64,
    pub total_bytes: u64,
}

impl Root {
    /// Space and inodes left on the filesystem that holds the root.
    pub fn room(&self) -> Result<Room, FsError> {
        let st = rustix::fs::fstatvfs(&self.fd).map_err(|e| fail("statvfs", &self.path, e))?;
        let unit = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        Ok(Room {
            bytes: st.f_bavail.saturating_mul(unit),
            inodes: st.f_favail,
            total_bytes: st.f_blocks.saturating_mul(unit),
        })
    }
}

impl Root {
    /// Opens (O_PATH|O_DIRECTORY) the root, and creates `<internal>/staging` and
    /// `<internal>/conflicts` if missing: hasync's own files, outside the live tree and on
    /// its filesystem (a staged file lands by rename; refused otherwise). Removes leftover
    /// staged files from a previous crash (they were never landed), and moves an older
    /// release's `<root>/.hasync` out of the live tree.
    pub fn open(path: &Path, internal: &Path) -> Result<Root, FsError> {
        let path = std::path::absolute(path).map_err(|source| FsError::Io {
            op: "open root",
            path: path.to_string_lossy().into_owned(),
            source,
        })?;
        // The root path is operator configuration: following symlinks in it is fine.
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail("open root", &path, e))?;
        let internal = std::path::absolute(internal)
            .map_err(|e| FsError::from_io("open internal dir", internal, e))?;
        std::fs::create_dir_all(&internal)
            .map_err(|e| FsError::from_io("create internal dir", &internal, e))?;
        let internal_fd = rustix::fs::openat(
            rustix::fs::CWD,
            &internal,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail("open internal dir", &internal, e))?;
        let dev_of = |fd: BorrowedFd<'_>, p: &Path| {
            rustix::fs::fstat(fd)
                .map(|st| st.st_dev)
                .map_err(|e| fail("stat", p, e))
        };
        if dev_of(fd.as_fd(), &path)? != dev_of(internal_fd.as_fd(), &internal)? {
            return Err(FsError::Io {
                op: "open internal dir",
                path: internal.to_string_lossy().into_owned(),
                source: std::io::Error::other(format!(
                    "on another filesystem than the store {}: staged files could not be renamed into place atomically",
                    path.display()
                )),
            });
        }
        let staging = internal_dir(internal_fd.as_fd(), STAGING_DIR.as_bytes(), &internal)?;
        let conflicts = internal_dir(internal_fd.as_fd(), CONFLICTS_DIR.as_bytes(), &internal)?;
        let tree_fd = fd
            .try_clone()
            .map_err(|e| FsError::from_io("open root", &path, e))?;
        let root = Root {
            tree: super::tree::Tree::from_fd(&path, tree_fd),
            path,
            internal,
            fd,
            staging,
            conflicts,
            owners: rustix::process::geteuid().is_root(),
            allow_special_modes: false,
            seq: AtomicU64::new(0),
            staged: Default::default(),
            unnamed_works: AtomicU8::new(UNNAMED_UNKNOWN),
            unnamed_max: unnamed_budget(),
        };
        root.clean_staging()?;
        root.migrate_legacy();
        Ok(root)
    }

    /// An older release kept `staging/` and `conflicts/` in `<root>/.hasync`:
    /// staged files are dropped, kept-aside ones moved to this release's
    /// conflicts, and the folder removed. A `.hasync` holding anything else
    /// is a user's folder and stays.
    fn migrate_legacy(&self) {
        let legacy = self.path.join(LEGACY_INTERNAL_DIR);
        let Ok(entries) = std::fs::read_dir(&legacy) else {
            return;
        };
        let names: Vec<std::ffi::OsString> = entries.flatten().map(|e| e.file_name()).collect();
        if names.is_empty() || !names.iter().all(|n| n == STAGING_DIR || n == CONFLICTS_DIR) {
            return;
        }
        let _ = std::fs::remove_dir_all(legacy.join(STAGING_DIR));
        if let Ok(slots) = std::fs::read_dir(legacy.join(CONFLICTS_DIR)) {
            for slot in slots.flatten() {
                let to = self.internal.join(CONFLICTS_DIR).join(slot.file_name());
                if let Err(e) = std::fs::rename(slot.path(), &to) {
                    tracing::warn!(from = %slot.path().display(), to = %to.display(), "cannot move an older release's kept-aside files: {e}");
                    return;
                }
            }
        }
        let _ = std::fs::remove_dir(legacy.join(CONFLICTS_DIR));
        match std::fs::remove_dir(&legacy) {
            Ok(()) => {
                tracing::info!(from = %legacy.display(), to = %self.internal.display(), "moved hasync's internal directory out of the live tree")
            }
            Err(e) => {
                tracing::warn!(path = %legacy.display(), "cannot remove an older release's internal directory: {e}")
            }
        }
    }

    /// hasync's own directory for this store (staging, conflicts).
    pub fn internal_path(&self) -> &Path {
        &self.internal
    }

    /// Lets the peer set setuid, setgid and world-writable modes
    /// (`[replication] allow_special_modes`); refused by default.
    pub fn allow_special_modes(mut self, allow: bool) -> Root {
        self.allow_special_modes = allow;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root for lookups below it (by descriptor, whatever the depth).
    pub fn tree(&self) -> &super::tree::Tree {
        &self.tree
    }

    /// Whether we run as root (then owners are applied; otherwise uid/gid are ignored).
    pub fn applies_owners(&self) -> bool {
        self.owners
    }

    fn abs(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    fn staged_name(id: u64) -> String {
        format!("{id:016x}")
    }

    fn staged_abs(&self, name: &str) -> PathBuf {
        self.internal.join(STAGING_DIR).join(name)
    }

    /// Refuses meta the kernel would reject or misread, and meta that would
    /// let the peer own this machine rather than mirror mail onto it,
    /// before anything changes: owner ids past [`OWNER_ID_MAX`], and
    /// (unless allowed) setuid, setgid and world-writable modes.
    fn check_meta(&self, rel: &[u8], meta: &Meta) -> Result<(), FsError> {
        if meta.mtime_nsec >= 1_000_000_000 {
            return Err(refused(rel, "mtime nanoseconds out of range"));
        }
        if self.owners && (meta.uid > OWNER_ID_MAX || meta.gid > OWNER_ID_MAX) {
            return Err(refused(rel, "owner or group id of 2^31 or more"));
        }
        if !self.allow_special_modes {
            if meta.mode & 0o6000 != 0 {
                return Err(refused(
                    rel,
                    "setuid or setgid mode (set replication.allow_special_modes to allow it)",
                ));
            }
            if meta.mode & 0o002 != 0 {
                return Err(refused(
                    rel,
                    "world-writable mode (set replication.allow_special_modes to allow it)",
                ));
            }
        }
        Ok(())
    }

    /// Owner, then mode (chown clears setuid/setgid), then times.
    fn apply_meta_fd(&self, fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), (&'static str, Errno)> {
        apply_meta(fd, meta, self.owners)
    }
}

/// Metadata of a staged file whose content is written (checked before with
/// [`Root::check_staged_meta`]); `owners` as [`Root::owners`].
pub fn apply_staged_meta(fd: BorrowedFd<'_>, meta: &Meta, owners: bool) -> Result<(), FsError> {
    apply_meta(fd, meta, owners).map_err(|(op, e)| fail(op, "<staged file>", e))
}

/// Owner, then mode (chown clears setuid/setgid), then times.
fn apply_meta(fd: BorrowedFd<'_>, meta: &Meta, owners: bool) -> Result<(), (&'static str, Errno)> {
    if owners {
        rustix::fs::fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| ("fchown", e))?;
    }
    rustix::fs::fchmod(fd, perm(meta)).map_err(|e| ("fchmod", e))?;
    rustix::fs::futimens(fd, &timestamps(meta)).map_err(|e| ("futimens", e))?;
    Ok(())
}

impl Root {
    /// Removes every staged file (none is landed any more: at start, or
    /// after a receiving session was cut short).
    pub fn clean_staging(&self) -> Result<(), FsError> {
        self.forget_staged();
        let fd = open_beneath(self.staging.as_fd(), b".", DIR_READ_OFLAGS)
            .map_err(|e| fail("open staging", self.internal.join(STAGING_DIR), e))?;
        let mut dir =
            Dir::new(fd).map_err(|e| fail("read staging", self.internal.join(STAGING_DIR), e))?;
        let mut removed = 0usize;
        while let Some(entry) = dir.read() {
            let entry =
                entry.map_err(|e| fail("read staging", self.internal.join(STAGING_DIR), e))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let dfd = dir
                .fd()
                .map_err(|e| fail("read staging", self.internal.join(STAGING_DIR), e))?;
            let rel = Path::new(STAGING_DIR).join(OsStr::from_bytes(name.to_bytes()));
            self.remove_entry(dfd, name, entry.file_type(), &rel)?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(root = %self.path.display(), removed, "removed leftover staged files");
        }
        Ok(())
    }

    /// Opens the parent directory of a split path beneath `base`. With
    /// `create`, missing directories are made (0755) component by component;
    /// without it, a missing component gives `Ok(None)`.
    fn walk<'b>(
        &self,
        base: BorrowedFd<'b>,
        base_rel: &Path,
        p: &Split<'_>,
        create: bool,
        op: &'static str,
    ) -> Result<Option<Opened<'b>>, FsError> {
        let (comps, parent) = (&p.comps[..], p.parent);
        if comps.is_empty() {
            return Ok(Some(Opened {
                dir: DirFd::Borrowed(base),
                created: Vec::new(),
            }));
        }
        // Fast path: the whole parent exists and is clean.
        match open_beneath(base, parent, WALK_OFLAGS) {
            Ok(fd) => {
                return Ok(Some(Opened {
                    dir: DirFd::Owned(fd),
                    created: Vec::new(),
                }))
            }
            Err(Errno::LOOP | Errno::XDEV) => return Err(refused(p.raw, TRAVERSES_SYMLINK)),
            Err(Errno::NOENT) if !create => return Ok(None),
            // Missing components to create, or a non-directory somewhere
            // (ENOTDIR is also what a symlink as the last component gives
            // with O_DIRECTORY|O_NOFOLLOW): go one component at a time.
            Err(Errno::NOENT | Errno::NOTDIR) => {}
            Err(e) => return Err(fail(op, self.abs(base_rel.join(bytes_path(parent))), e)),
        }
        let mut cur =
            open_beneath(base, b".", WALK_OFLAGS).map_err(|e| fail(op, self.abs(base_rel), e))?;
        let mut created = Vec::new();
        let res = self.walk_slow(&mut cur, &mut created, base_rel, p, create, op);
        match res {
            Ok(true) => {}
            Ok(false) => {
                self.rollback(base, comps, &created);
                return Ok(None);
            }
            Err(e) => {
                self.rollback(base, comps, &created);
                return Err(e);
            }
        }
        if !created.is_empty() {
            // A created directory is durable once the directory holding it is
            // fsynced. The caller fsyncs the final parent; we do the rest,
            // which is rare (a new folder's first message).
            if let Err(e) = self.fsync_containers(base, base_rel, comps, &created, op) {
                self.rollback(base, comps, &created);
                return Err(e);
            }
        }
        Ok(Some(Opened {
            dir: DirFd::Owned(cur),
            created,
        }))
    }

    fn walk_slow(
        &self,
        cur: &mut OwnedFd,
        created: &mut Vec<usize>,
        base_rel: &Path,
        p: &Split<'_>,
        create: bool,
        op: &'static str,
    ) -> Result<bool, FsError> {
        let comps = &p.comps[..];
        for (i, comp) in comps.iter().enumerate() {
            let here = || base_rel.join(bytes_path(&join(&comps[..=i])));
            let next = match open_beneath(cur.as_fd(), comp, WALK_OFLAGS) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(cur.as_fd(), *comp, Mode::from_raw_mode(0o755)) {
                        Ok(()) => created.push(i),
                        // Someone else made it meanwhile: fine, just not ours to undo.
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(fail(op, self.abs(here()), e)),
                    }
                    let fd = match open_beneath(cur.as_fd(), comp, DIR_READ_OFLAGS) {
                        Ok(fd) => fd,
                        Err(Errno::LOOP | Errno::XDEV) => {
                            return Err(refused(p.raw, TRAVERSES_SYMLINK))
                        }
                        Err(e) => return Err(fail(op, self.abs(here()), e)),
                    };
                    if created.last() == Some(&i) {
                        // Exact 0755 whatever the umask; the real meta comes with its Mkdir.
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                            .map_err(|e| fail(op, self.abs(here()), e))?;
                    }
                    fd
                }
                Err(Errno::NOENT) => return Ok(false),
                Err(Errno::LOOP | Errno::XDEV) => return Err(refused(p.raw, TRAVERSES_SYMLINK)),
                Err(Errno::NOTDIR) if is_symlink_at(cur.as_fd(), comp) => {
                    return Err(refused(p.raw, TRAVERSES_SYMLINK))
                }
                // A file where a folder is named: nothing below it exists.
                Err(Errno::NOTDIR) if !create => return Ok(false),
                Err(e) => return Err(fail(op, self.abs(here()), e)),
            };
            *cur = next;
        }
        Ok(true)
    }

    /// fsyncs every directory that received a directory we created, except
    /// the last created one's contents (that is the caller's parent).
    fn fsync_containers(
        &self,
        base: BorrowedFd<'_>,
        base_rel: &Path,
        comps: &[&[u8]],
        created: &[usize],
        op: &'static str,
    ) -> Result<(), FsError> {
        for &i in created {
            let container = join(&comps[..i]);
            let target: &[u8] = if container.is_empty() {
                b"."
            } else {
                &container
            };
            let path = self.abs(base_rel.join(bytes_path(&container)));
            let fd = open_beneath(base, target, DIR_READ_OFLAGS).map_err(|e| fail(op, &path, e))?;
            rustix::fs::fsync(&fd).map_err(|e| fail(op, &path, e))?;
        }
        Ok(())
    }

    /// Best effort: removes the directories a failed operation created, deepest first.
    fn rollback(&self, base: BorrowedFd<'_>, comps: &[&[u8]], created: &[usize]) {
        for &i in created.iter().rev() {
            let container = join(&comps[..i]);
            let target: &[u8] = if container.is_empty() {
                b"."
            } else {
                &container
            };
            if let Ok(fd) = open_beneath(base, target, WALK_OFLAGS) {
                let _ = rustix::fs::unlinkat(&fd, comps[i], AtFlags::REMOVEDIR);
            }
        }
    }

    /// Whether this filesystem makes unnamed files and links them into a
    /// directory: tried once, with a file linked to a temporary name in
    /// staging and removed. Where it cannot (no `O_TMPFILE`; `linkat` of
    /// a descriptor refused to this process and no `/proc`), staged files
    /// are named from then on; a failure that says nothing about that (a
    /// full disk, no descriptor left) leaves it to be tried again.
    fn unnamed_works(&self) -> bool {
        match self.unnamed_works.load(Ordering::Relaxed) {
            UNNAMED_WORKS => return true,
            UNNAMED_UNSUPPORTED => return false,
            _ => {}
        }
        let tried = self
            .open_unnamed()
            .map_err(|e| ("create", e))
            .and_then(|fd| {
                let tmp = self
                    .temp_in_staging(|tmp| link_fd(fd.as_fd(), self.staging.as_fd(), tmp))
                    .map_err(|e| ("link", e))?;
                let _ = rustix::fs::unlinkat(&self.staging, tmp.as_str(), AtFlags::empty());
                Ok(())
            });
        let state = match tried {
            Ok(()) => UNNAMED_WORKS,
            Err((op, e)) if unnamed_unsupported(e) => {
                tracing::info!(
                    dir = %self.internal.join(STAGING_DIR).display(),
                    error = %std::io::Error::from(e),
                    "cannot {op} unnamed files (O_TMPFILE) here: files are staged under names"
                );
                UNNAMED_UNSUPPORTED
            }
            Err(_) => return false,
        };
        self.unnamed_works.store(state, Ordering::Relaxed);
        state == UNNAMED_WORKS
    }

    fn open_unnamed(&self) -> Result<OwnedFd, Errno> {
        rustix::fs::openat(
            &self.staging,
            c".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    }

    /// Creates the staged file `id` (mode 0600, write-only) and returns
    /// its descriptor for the caller to write into. It is unnamed
    /// (`O_TMPFILE`: in no directory until it lands) where the filesystem
    /// allows it and fewer are than [`UNNAMED_STAGED_MAX`] (and a quarter
    /// of the descriptor limit) in this process, else named after `id` in
    /// the staging directory (O_CREAT|O_EXCL). An id staged already is an
    /// error.
    pub fn create_staged(&self, id: u64) -> Result<OwnedFd, FsError> {
        let name = Self::staged_name(id);
        let mut staged = self.staged.lock().expect("staged files lock");
        if staged.unnamed.contains_key(&id) || staged.named.contains(&id) {
            return Err(fail("create staged", self.staged_abs(&name), Errno::EXIST));
        }
        if staged.unnamed.len() < self.unnamed_max && self.unnamed_works() && reserve_unnamed() {
            let shown = || self.internal.join(STAGING_DIR);
            let made = self
                .open_unnamed()
                .map_err(|e| fail("create staged", shown(), e));
            let made = made.and_then(|fd| {
                let kept = fd
                    .try_clone()
                    .map_err(|e| FsError::from_io("create staged", shown(), e))?;
                Ok((fd, kept))
            });
            return match made {
                Ok((fd, kept)) => {
                    staged.unnamed.insert(id, kept);
                    Ok(fd)
                }
                Err(e) => {
                    UNNAMED_HELD.fetch_sub(1, Ordering::Relaxed);
                    Err(e)
                }
            };
        }
        rustix::fs::openat2(
            &self.staging,
            name.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
            RESOLVE,
        )
        .inspect(|_| {
            staged.named.insert(id);
        })
        .map_err(|e| fail("create staged", self.staged_abs(&name), e))
    }

    /// Applies meta to the staged file (fchown if root, fchmod, futimens mtime; atime = mtime).
    /// Call it after the last write: a later write moves the mtime again. Its changes are
    /// made durable by the file's fsync.
    /// Refuses metadata a staged file cannot take (before it is queued for
    /// [`apply_staged_meta`] on another thread).
    pub fn check_staged_meta(&self, meta: &Meta) -> Result<(), FsError> {
        self.check_meta(b"<staged file>", meta)
    }

    /// Whether owners are applied (running as root).
    pub fn owners(&self) -> bool {
        self.owners
    }

    pub fn finish_staged(&self, fd: &OwnedFd, meta: &Meta) -> Result<(), FsError> {
        self.check_meta(b"<staged file>", meta)?;
        self.apply_meta_fd(fd.as_fd(), meta)
            .map_err(|(op, e)| fail(op, "<staged file>", e))
    }

    /// Removes a staged file (hash mismatch, error, ENOSPC). Never fails loudly if already gone.
    pub fn discard_staged(&self, id: u64) {
        if self.take_unnamed(id).is_some() {
            // Its last descriptor closed: the inode is freed.
            return;
        }
        let name = self.take_named(id);
        match rustix::fs::unlinkat(&self.staging, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => tracing::warn!(
                path = %self.staged_abs(&name).display(),
                error = %std::io::Error::from(e),
                "could not discard staged file"
            ),
        }
    }

    /// fsync a staged file by fd (callers that prefer to batch fsyncs via io_uring use their
    /// own fd instead).
    pub fn fsync_staged(&self, fd: &OwnedFd) -> Result<(), FsError> {
        rustix::fs::fsync(fd).map_err(|e| fail("fsync", "<staged file>", e))
    }

    /// Moves staged file `id` to `rel` (renameat into the parent, replacing an existing file).
    /// Creates missing parent directories (0755). If `rel` is a directory → error (EISDIR).
    /// With `keep_aside`, an existing non-directory at `rel` is first moved to the conflicts
    /// dir. Returns the parent directory (relative to the root) to fsync.
    pub fn land(&self, id: u64, rel: &Path, keep_aside: bool) -> Result<PathBuf, FsError> {
        const OP: &str = "land";
        let p = Split::new(rel)?;
        let base = self.fd.as_fd();
        let Some(opened) = self.walk(base, Path::new(""), &p, true, OP)? else {
            unreachable!("walk with create never reports a missing parent")
        };
        let parent = opened.dir.fd();
        let res = (|| {
            let mut aside = None;
            if keep_aside {
                match rustix::fs::statat(parent, p.name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        return Err(fail(OP, self.abs(p.path()), Errno::ISDIR));
                    }
                    Ok(_) => aside = Some(self.move_aside(parent, &p, OP)?),
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(fail(OP, self.abs(p.path()), e)),
                }
            }
            let placed = match self.take_unnamed(id) {
                Some(fd) => self.link_unnamed(fd.as_fd(), parent, p.name),
                // renameat never follows `p.name`: a symlink there is replaced.
                None => {
                    let name = self.take_named(id);
                    rustix::fs::renameat(&self.staging, name.as_str(), parent, p.name)
                }
            };
            if let Err(e) = placed {
                if let Some(a) = aside {
                    self.move_back(&a, parent, &p);
                }
                return Err(fail(OP, self.abs(p.path()), e));
            }
            Ok(())
        })();
        if let Err(e) = res {
            self.rollback(base, &p.comps, &opened.created);
            return Err(e);
        }
        Ok(p.parent_path())
    }

    fn take_unnamed(&self, id: u64) -> Option<OwnedFd> {
        let fd = self
            .staged
            .lock()
            .expect("staged files lock")
            .unnamed
            .remove(&id);
        if fd.is_some() {
            UNNAMED_HELD.fetch_sub(1, Ordering::Relaxed);
        }
        fd
    }

    /// Forgets `id` as a staged file named in staging; returns that name.
    fn take_named(&self, id: u64) -> String {
        self.staged
            .lock()
            .expect("staged files lock")
            .named
            .remove(&id);
        Self::staged_name(id)
    }

    /// Forgets every staged file (closing the unnamed ones' descriptors).
    fn forget_staged(&self) {
        let mut staged = self.staged.lock().expect("staged files lock");
        UNNAMED_HELD.fetch_sub(staged.unnamed.len(), Ordering::Relaxed);
        staged.unnamed.clear();
        staged.named.clear();
    }

    /// Gives the unnamed file `fd` the name `name` in `parent`, replacing
    /// what is there atomically (as a rename would: linked to a temporary
    /// name in staging first, then renamed over it).
    fn link_unnamed(
        &self,
        fd: BorrowedFd<'_>,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), Errno> {
        match link_fd(fd, parent, name) {
            Err(Errno::EXIST) => {}
            done => return done,
        }
        let tmp = self.temp_in_staging(|tmp| link_fd(fd, self.staging.as_fd(), tmp))?;
        // renameat never follows `name`: a symlink there is replaced.
        let res = rustix::fs::renameat(&self.staging, tmp.as_str(), parent, name);
        if res.is_err() {
            let _ = rustix::fs::unlinkat(&self.staging, tmp.as_str(), AtFlags::empty());
        }
        res
    }

    /// Creates directory `rel` (and missing parents) or updates an existing one's meta.
    /// A non-directory at `rel` is an error (EEXIST). Returns the parent directory to fsync.
    ///
    /// The directory's mtime changes again whenever an entry is added or removed in it, so
    /// the caller re-sends the Mkdir after filling a directory if its mtime matters.
    pub fn mkdir(&self, rel: &Path, meta: &Meta) -> Result<PathBuf, FsError> {
        const OP: &str = "mkdir";
        let p = Split::new(rel)?;
        self.check_meta(p.raw, meta)?;
        let base = self.fd.as_fd();
        let Some(opened) = self.walk(base, Path::new(""), &p, true, OP)? else {
            unreachable!("walk with create never reports a missing parent")
        };
        let parent = opened.dir.fd();
        // Created 0700 so it is never visible with looser modes than meant.
        let made = match rustix::fs::mkdirat(parent, p.name, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => {
                self.rollback(base, &p.comps, &opened.created);
                return Err(fail(OP, self.abs(p.path()), e));
            }
        };
        let res = match open_beneath(parent, p.name, DIR_READ_OFLAGS) {
            // An existing directory keeps its owner: the peer mirrors
            // folders, it does not re-own what is already here.
            Ok(fd) => if made {
                self.apply_meta_fd(fd.as_fd(), meta)
            } else {
                apply_meta(fd.as_fd(), meta, false)
            }
            .map_err(|(op, e)| fail(op, self.abs(p.path()), e)),
            // A symlink or a file is in the way: the caller decides.
            Err(Errno::LOOP | Errno::NOTDIR) => Err(fail(OP, self.abs(p.path()), Errno::EXIST)),
            Err(e) => Err(fail(OP, self.abs(p.path()), e)),
        };
        if let Err(e) = res {
            if made {
                let _ = rustix::fs::unlinkat(parent, p.name, AtFlags::REMOVEDIR);
            }
            self.rollback(base, &p.comps, &opened.created);
            return Err(e);
        }
        Ok(p.parent_path())
    }

    /// Deletes a file/symlink, or a directory recursively (never following symlinks).
    /// Missing = `Ok(None)`. With keep_aside, moves it to conflicts instead. Returns the
    /// parent dir to fsync.
    pub fn remove(&self, rel: &Path, keep_aside: bool) -> Result<Option<PathBuf>, FsError> {
        const OP: &str = "remove";
        let p = Split::new(rel)?;
        let base = self.fd.as_fd();
        let Some(opened) = self.walk(base, Path::new(""), &p, false, OP)? else {
            return Ok(None);
        };
        let parent = opened.dir.fd();
        let st = match rustix::fs::statat(parent, p.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(fail(OP, self.abs(p.path()), e)),
        };
        if keep_aside {
            self.move_aside(parent, &p, OP)?;
            return Ok(Some(p.parent_path()));
        }
        let name = CString::new(p.name).expect("validated: no NUL");
        self.remove_entry(parent, &name, FileType::from_raw_mode(st.st_mode), p.path())?;
        Ok(Some(p.parent_path()))
    }

    /// Removes one entry of `dir`, descending into directories without following links.
    fn remove_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        ft: FileType,
        rel: &Path,
    ) -> Result<(), FsError> {
        const OP: &str = "remove";
        let ft = if ft == FileType::Unknown {
            match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => FileType::from_raw_mode(st.st_mode),
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(fail(OP, self.abs(rel), e)),
            }
        } else {
            ft
        };
        if ft != FileType::Directory {
            return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                // It became a directory meanwhile.
                Err(Errno::ISDIR) => self.remove_tree(dir, name, rel),
                Err(e) => Err(fail(OP, self.abs(rel), e)),
            };
        }
        self.remove_tree(dir, name, rel)
    }

    /// The names in folder `rel` (none if nothing or no folder is there,
    /// or it cannot be read: the caller's own op on it then says why).
    pub fn list(&self, rel: &Path) -> Vec<std::ffi::OsString> {
        let Ok(fd) = open_beneath(self.fd.as_fd(), rel.as_os_str().as_bytes(), DIR_READ_OFLAGS)
        else {
            return Vec::new();
        };
        let Ok(mut dir) = Dir::new(fd) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(Ok(entry)) = dir.read() {
            let name = entry.file_name();
            if name != c"." && name != c".." {
                out.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
            }
        }
        out
    }

    /// Removes the directory `name` of `parent` and everything in it.
    ///
    /// Iterative, holding no descriptor across levels: each folder is
    /// opened below the tree's top by its path (beneath it, no symlinks),
    /// emptied of files, and removed once its subfolders are, deepest
    /// first. Depth costs no descriptors and no stack.
    fn remove_tree(&self, parent: BorrowedFd<'_>, name: &CStr, rel: &Path) -> Result<(), FsError> {
        const OP: &str = "remove";
        let top = match open_beneath(parent, name.to_bytes(), WALK_OFLAGS) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            // Replaced by a symlink or file meanwhile: remove that, never follow it.
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => Ok(()),
                    Err(e) => Err(fail(OP, self.abs(rel), e)),
                }
            }
            Err(e) => return Err(fail(OP, self.abs(rel), e)),
        };
        let here = |sub: &[u8]| {
            if sub.is_empty() {
                self.abs(rel)
            } else {
                self.abs(rel.join(bytes_path(sub)))
            }
        };
        for pass in 1..=REMOVE_PASSES_MAX {
            // Folders below the top, parents before children.
            let mut found: Vec<Vec<u8>> = Vec::new();
            let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
            while let Some(sub) = todo.pop() {
                let target: &[u8] = if sub.is_empty() { b"." } else { &sub };
                let fd = match open_beneath(top.as_fd(), target, DIR_READ_OFLAGS) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV) => {
                        // A symlink or file took the folder's place: unlink it.
                        let (p, last) = split_last(&sub);
                        let pfd = open_beneath(top.as_fd(), p, WALK_OFLAGS)
                            .map_err(|e| fail(OP, here(&sub), e))?;
                        match rustix::fs::unlinkat(&pfd, last, AtFlags::empty()) {
                            Ok(()) | Err(Errno::NOENT) => continue,
                            Err(e) => return Err(fail(OP, here(&sub), e)),
                        }
                    }
                    Err(e) => return Err(fail(OP, here(&sub), e)),
                };
                let mut dir = Dir::new(fd).map_err(|e| fail(OP, here(&sub), e))?;
                while let Some(entry) = dir.read() {
                    let entry = entry.map_err(|e| fail(OP, here(&sub), e))?;
                    let child = entry.file_name();
                    if child == c"." || child == c".." {
                        continue;
                    }
                    let mut child_sub = sub.clone();
                    if !child_sub.is_empty() {
                        child_sub.push(b'/');
                    }
                    child_sub.extend_from_slice(child.to_bytes());
                    let dfd = dir.fd().map_err(|e| fail(OP, here(&sub), e))?;
                    let is_dir = match entry.file_type() {
                        FileType::Directory => true,
                        FileType::Unknown => {
                            match rustix::fs::statat(dfd, child, AtFlags::SYMLINK_NOFOLLOW) {
                                Ok(st) => {
                                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                                }
                                Err(Errno::NOENT) => continue,
                                Err(e) => return Err(fail(OP, here(&child_sub), e)),
                            }
                        }
                        _ => false,
                    };
                    if is_dir {
                        found.push(child_sub.clone());
                        todo.push(child_sub);
                        continue;
                    }
                    match rustix::fs::unlinkat(dfd, child, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        // Became a folder meanwhile: the next pass takes it.
                        Err(Errno::ISDIR) => {}
                        Err(e) => return Err(fail(OP, here(&child_sub), e)),
                    }
                }
            }
            // Deepest first: a child's path is longer than its parent's.
            found.sort_by_key(|sub| std::cmp::Reverse(sub.len()));
            let mut busy = false;
            for sub in &found {
                let (p, last) = split_last(sub);
                let pfd = match open_beneath(top.as_fd(), p, WALK_OFLAGS) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(fail(OP, here(sub), e)),
                };
                match rustix::fs::unlinkat(&pfd, last, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(Errno::NOTEMPTY) => busy = true,
                    Err(e) => return Err(fail(OP, here(sub), e)),
                }
            }
            if busy {
                continue;
            }
            match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => return Ok(()),
                // Entries appeared meanwhile: another pass.
                Err(Errno::NOTEMPTY) if pass < REMOVE_PASSES_MAX => {}
                Err(e) => return Err(fail(OP, self.abs(rel), e)),
            }
        }
        Err(fail(OP, self.abs(rel), Errno::NOTEMPTY))
    }

    /// renameat(from, to) for a file or directory (replacing a file at `to`; creating `to`'s
    /// parents). Source missing → `Ok(RenameOutcome::SourceMissing)`.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<RenameOutcome, FsError> {
        const OP: &str = "rename";
        let f = Split::new(from)?;
        let t = Split::new(to)?;
        let base = self.fd.as_fd();
        let Some(fo) = self.walk(base, Path::new(""), &f, false, OP)? else {
            return Ok(RenameOutcome::SourceMissing);
        };
        match rustix::fs::statat(fo.dir.fd(), f.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile | FileType::Directory | FileType::Symlink => {}
                _ => {
                    return Err(refused(
                        f.raw,
                        "rename source is not a file, folder or symlink",
                    ))
                }
            },
            Err(Errno::NOENT) => return Ok(RenameOutcome::SourceMissing),
            Err(e) => return Err(fail(OP, self.abs(f.path()), e)),
        }
        let Some(to_dir) = self.walk(base, Path::new(""), &t, true, OP)? else {
            unreachable!("walk with create never reports a missing parent")
        };
        // rename(2) between two names of one inode does nothing and leaves
        // both; the primary has only `to` now (its name arrived first, as a
        // link): drop `from`.
        let same_inode = |a: &rustix::fs::Stat, b: &rustix::fs::Stat| {
            a.st_dev == b.st_dev && a.st_ino == b.st_ino
        };
        if let (Ok(a), Ok(b)) = (
            rustix::fs::statat(fo.dir.fd(), f.name, AtFlags::SYMLINK_NOFOLLOW),
            rustix::fs::statat(to_dir.dir.fd(), t.name, AtFlags::SYMLINK_NOFOLLOW),
        ) {
            if same_inode(&a, &b) && FileType::from_raw_mode(a.st_mode) != FileType::Directory {
                return match rustix::fs::unlinkat(fo.dir.fd(), f.name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => Ok(RenameOutcome::Renamed),
                    Err(e) => Err(fail(OP, self.abs(f.path()), e)),
                };
            }
        }
        match rustix::fs::renameat(fo.dir.fd(), f.name, to_dir.dir.fd(), t.name) {
            Ok(()) => Ok(RenameOutcome::Renamed),
            Err(Errno::NOENT) => {
                self.rollback(base, &t.comps, &to_dir.created);
                Ok(RenameOutcome::SourceMissing)
            }
            Err(e) => {
                self.rollback(base, &t.comps, &to_dir.created);
                Err(fail(OP, self.abs(t.path()), e))
            }
        }
    }

    /// linkat(existing, new) without following `existing`. Same inode already at `new` →
    /// `Linked`; `existing` missing → `SourceMissing`; another file at `new` is replaced
    /// atomically (linked to a temp name in staging, then renamed over).
    pub fn link(&self, existing: &Path, new: &Path) -> Result<LinkOutcome, FsError> {
        const OP: &str = "link";
        let e = Split::new(existing)?;
        let n = Split::new(new)?;
        let base = self.fd.as_fd();
        let Some(eo) = self.walk(base, Path::new(""), &e, false, OP)? else {
            return Ok(LinkOutcome::SourceMissing);
        };
        let est = match rustix::fs::statat(eo.dir.fd(), e.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(LinkOutcome::SourceMissing),
            Err(err) => return Err(fail(OP, self.abs(e.path()), err)),
        };
        match FileType::from_raw_mode(est.st_mode) {
            // A hard link to a symlink is a link to the symlink itself.
            FileType::RegularFile | FileType::Symlink => {}
            FileType::Directory => return Err(fail(OP, self.abs(e.path()), Errno::PERM)),
            _ => {
                return Err(refused(
                    e.raw,
                    "link source is not a regular file or symlink",
                ))
            }
        }
        let Some(no) = self.walk(base, Path::new(""), &n, true, OP)? else {
            unreachable!("walk with create never reports a missing parent")
        };
        let res = self.link_into(&eo, &e, &no, &n, &est);
        if !matches!(res, Ok(LinkOutcome::Linked)) {
            self.rollback(base, &n.comps, &no.created);
        }
        res
    }

    fn link_into(
        &self,
        eo: &Opened<'_>,
        e: &Split<'_>,
        no: &Opened<'_>,
        n: &Split<'_>,
        est: &rustix::fs::Stat,
    ) -> Result<LinkOutcome, FsError> {
        const OP: &str = "link";
        match rustix::fs::statat(no.dir.fd(), n.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_dev == est.st_dev && st.st_ino == est.st_ino => {
                return Ok(LinkOutcome::Linked)
            }
            Ok(_) => {}
            Err(Errno::NOENT) => {
                match rustix::fs::linkat(eo.dir.fd(), e.name, no.dir.fd(), n.name, AtFlags::empty())
                {
                    Ok(()) => return Ok(LinkOutcome::Linked),
                    Err(Errno::NOENT) => return Ok(LinkOutcome::SourceMissing),
                    // Appeared meanwhile: replace it like any other.
                    Err(Errno::EXIST) => {}
                    Err(err) => return Err(fail(OP, self.abs(n.path()), err)),
                }
            }
            Err(err) => return Err(fail(OP, self.abs(n.path()), err)),
        }
        let tmp = self.temp_in_staging(|tmp| {
            rustix::fs::linkat(eo.dir.fd(), e.name, &self.staging, tmp, AtFlags::empty())
        });
        let tmp = match tmp {
            Ok(tmp) => tmp,
            Err(Errno::NOENT) => return Ok(LinkOutcome::SourceMissing),
            Err(err) => return Err(fail(OP, self.abs(n.path()), err)),
        };
        let res = rustix::fs::renameat(&self.staging, tmp.as_str(), no.dir.fd(), n.name);
        // After a successful rename the temp name is normally gone; it stays
        // only if `new` already was the same inode (rename then does nothing).
        let _ = rustix::fs::unlinkat(&self.staging, tmp.as_str(), AtFlags::empty());
        res.map_err(|err| fail(OP, self.abs(n.path()), err))?;
        Ok(LinkOutcome::Linked)
    }

    /// Runs `make` with fresh temporary names in staging until one is free.
    fn temp_in_staging(
        &self,
        mut make: impl FnMut(&str) -> Result<(), Errno>,
    ) -> Result<String, Errno> {
        for _ in 0..NAME_TRIES_MAX {
            // Staged names are 16 hex digits; the `t-` prefix cannot collide with them.
            let tmp = format!("t-{:x}", self.seq.fetch_add(1, Ordering::Relaxed));
            match make(&tmp) {
                Ok(()) => return Ok(tmp),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EXIST)
    }

    /// Creates/replaces a symlink (target stored verbatim; never followed by us) with meta
    /// (owner if root, mtime; a symlink's own mode does not exist on Linux). Returns the
    /// parent dir to fsync.
    pub fn symlink(&self, rel: &Path, target: &[u8], meta: &Meta) -> Result<PathBuf, FsError> {
        const OP: &str = "symlink";
        let p = Split::new(rel)?;
        if target.is_empty() {
            return Err(refused(p.raw, "empty symlink target"));
        }
        if target.contains(&0) {
            return Err(refused(p.raw, "NUL byte in symlink target"));
        }
        if target.len() >= PATH_BYTES_MAX {
            return Err(refused(p.raw, "symlink target longer than 4095 bytes"));
        }
        // A symlink has no mode of its own on Linux (lstat shows 0777).
        self.check_meta(
            p.raw,
            &Meta {
                mode: 0o755,
                ..*meta
            },
        )?;
        let base = self.fd.as_fd();
        let Some(opened) = self.walk(base, Path::new(""), &p, true, OP)? else {
            unreachable!("walk with create never reports a missing parent")
        };
        // Built complete in staging, then renamed over whatever is at `rel`:
        // the name never shows a half-made link.
        let tmp =
            match self.temp_in_staging(|tmp| rustix::fs::symlinkat(target, &self.staging, tmp)) {
                Ok(tmp) => tmp,
                Err(e) => {
                    self.rollback(base, &p.comps, &opened.created);
                    return Err(fail(OP, self.abs(p.path()), e));
                }
            };
        let res = (|| {
            if self.owners {
                rustix::fs::chownat(
                    &self.staging,
                    tmp.as_str(),
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ("fchownat", e))?;
            }
            rustix::fs::utimensat(
                &self.staging,
                tmp.as_str(),
                &timestamps(meta),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| ("utimensat", e))?;
            rustix::fs::renameat(&self.staging, tmp.as_str(), opened.dir.fd(), p.name)
                .map_err(|e| (OP, e))
        })();
        if let Err((op, e)) = res {
            let _ = rustix::fs::unlinkat(&self.staging, tmp.as_str(), AtFlags::empty());
            self.rollback(base, &p.comps, &opened.created);
            return Err(fail(op, self.abs(p.path()), e));
        }
        Ok(p.parent_path())
    }

    /// Moves whatever is at `rel` into `.hasync/conflicts/<unix_seconds>-<counter>/<rel>`;
    /// returns the new path (absolute, for the log), or `None` if nothing was there. The
    /// move is made durable here (conflicts are rare; the caller cannot see those dirs).
    pub fn keep_aside(&self, rel: &Path) -> Result<Option<PathBuf>, FsError> {
        const OP: &str = "keep aside";
        let p = Split::new(rel)?;
        if crate::failpoint::fails("fsops.keep_aside_eio") {
            return Err(fail(OP, self.abs(p.path()), Errno::IO));
        }
        let base = self.fd.as_fd();
        let Some(opened) = self.walk(base, Path::new(""), &p, false, OP)? else {
            return Ok(None);
        };
        let parent = opened.dir.fd();
        match rustix::fs::statat(parent, p.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => {}
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(fail(OP, self.abs(p.path()), e)),
        }
        let aside = self.move_aside(parent, &p, OP)?;
        // The source side, which our caller has no reason to fsync.
        let src = p.parent_path();
        let fd =
            open_beneath(parent, b".", DIR_READ_OFLAGS).map_err(|e| fail(OP, self.abs(&src), e))?;
        rustix::fs::fsync(&fd).map_err(|e| fail(OP, self.abs(&src), e))?;
        Ok(Some(aside.abs))
    }

    /// Moves `p` (whose parent is `parent`) into a fresh conflict slot and
    /// makes the new name durable.
    fn move_aside(
        &self,
        parent: BorrowedFd<'_>,
        p: &Split<'_>,
        op: &'static str,
    ) -> Result<Aside, FsError> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut slot = None;
        for _ in 0..NAME_TRIES_MAX {
            let name = format!("{secs}-{}", self.seq.fetch_add(1, Ordering::Relaxed));
            match rustix::fs::mkdirat(&self.conflicts, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    slot = Some(name);
                    break;
                }
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(fail(op, self.internal.join(CONFLICTS_DIR).join(&name), e)),
            }
        }
        let Some(slot) = slot else {
            return Err(fail(op, self.internal.join(CONFLICTS_DIR), Errno::EXIST));
        };
        // Absolute: `abs` of it, and of anything walked below it, names
        // the internal directory, not the store.
        let slot_rel = self.internal.join(CONFLICTS_DIR).join(&slot);
        let drop_slot = || {
            let _ = rustix::fs::unlinkat(&self.conflicts, slot.as_str(), AtFlags::REMOVEDIR);
        };
        let slot_fd = match open_beneath(self.conflicts.as_fd(), slot.as_bytes(), WALK_OFLAGS) {
            Ok(fd) => fd,
            Err(e) => {
                drop_slot();
                return Err(fail(op, self.abs(&slot_rel), e));
            }
        };
        let dest = match self.walk(slot_fd.as_fd(), &slot_rel, p, true, op) {
            Ok(Some(o)) => o,
            Ok(None) => unreachable!("walk with create never reports a missing parent"),
            Err(e) => {
                drop_slot();
                return Err(e);
            }
        };
        let abs = self.abs(slot_rel.join(p.path()));
        let res = rustix::fs::renameat(parent, p.name, dest.dir.fd(), p.name)
            .map_err(|e| fail(op, &abs, e))
            .and_then(|()| {
                // Durable: the entry in its new parent, the slot in conflicts.
                let fd = open_beneath(dest.dir.fd(), b".", DIR_READ_OFLAGS)
                    .map_err(|e| fail(op, &abs, e))?;
                rustix::fs::fsync(&fd).map_err(|e| fail(op, &abs, e))?;
                let fd = open_beneath(self.conflicts.as_fd(), b".", DIR_READ_OFLAGS)
                    .map_err(|e| fail(op, self.internal.join(CONFLICTS_DIR), e))?;
                rustix::fs::fsync(&fd)
                    .map_err(|e| fail(op, self.internal.join(CONFLICTS_DIR), e))?;
                Ok(())
            });
        if let Err(e) = res {
            // The rename may have happened before a failed fsync.
            if let Err(back) = rustix::fs::renameat_with(
                dest.dir.fd(),
                p.name,
                parent,
                p.name,
                RenameFlags::NOREPLACE,
            ) {
                if back != Errno::NOENT {
                    tracing::warn!(kept = %abs.display(), error = %std::io::Error::from(back), "could not move kept-aside entry back");
                    return Err(e);
                }
            }
            self.rollback(slot_fd.as_fd(), &p.comps, &dest.created);
            drop(dest);
            drop_slot();
            return Err(e);
        }
        tracing::warn!(from = %self.abs(p.path()).display(), to = %abs.display(), "kept conflict loser aside");
        let parent_fd = match dest.dir {
            DirFd::Owned(fd) => fd,
            DirFd::Borrowed(_) => slot_fd,
        };
        Ok(Aside {
            parent: parent_fd,
            abs,
        })
    }

    /// Best effort undo of `move_aside` when what it made room for failed.
    fn move_back(&self, a: &Aside, parent: BorrowedFd<'_>, p: &Split<'_>) {
        if let Err(e) =
            rustix::fs::renameat_with(&a.parent, p.name, parent, p.name, RenameFlags::NOREPLACE)
        {
            if e != Errno::NOENT {
                tracing::warn!(
                    kept = %a.abs.display(),
                    error = %std::io::Error::from(e),
                    "could not move kept-aside file back"
                );
            }
        }
    }

    /// fsync a directory given as returned by the methods above (relative to root, "" = root).
    /// A directory that no longer exists is `Ok`:
    /// a later operation removed it, and its removal is durable with its own parent.
    pub fn fsync_dir(&self, rel_dir: &Path) -> Result<(), FsError> {
        match self.open_dir(rel_dir)? {
            Some(fd) => rustix::fs::fsync(&fd).map_err(|e| fail("fsync", self.abs(rel_dir), e)),
            None => Ok(()),
        }
    }

    /// Refuses a folder's metadata as [`Root::mkdir`] would.
    pub fn check_dir_meta(&self, rel: &Path, meta: &Meta) -> Result<(), FsError> {
        self.check_meta(rel.as_os_str().as_bytes(), meta)
    }

    /// Sets a folder's mtime (and atime) to `meta`'s; `Ok(false)` when the
    /// folder is gone. Its mode and owner are [`Root::mkdir`]'s.
    pub fn set_dir_times(&self, rel_dir: &Path, meta: &Meta) -> Result<bool, FsError> {
        if meta.mtime_nsec >= 1_000_000_000 {
            return Err(refused(
                rel_dir.as_os_str().as_bytes(),
                "mtime nanoseconds out of range",
            ));
        }
        match self.open_dir(rel_dir)? {
            Some(fd) => {
                rustix::fs::futimens(&fd, &timestamps(meta))
                    .map_err(|e| fail("futimens", self.abs(rel_dir), e))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Opens a directory as [`Root::fsync_dir`] names it, for an fsync
    /// submitted elsewhere (io_uring); `None` when it no longer exists.
    pub fn open_dir(&self, rel_dir: &Path) -> Result<Option<OwnedFd>, FsError> {
        const OP: &str = "fsync";
        let raw = rel_dir.as_os_str().as_bytes();
        let base = self.fd.as_fd();
        let fd = if raw.is_empty() {
            open_beneath(base, b".", DIR_READ_OFLAGS).map_err(|e| fail(OP, &self.path, e))?
        } else {
            let p = Split::parse(raw)?;
            let Some(opened) = self.walk(base, Path::new(""), &p, false, OP)? else {
                return Ok(None);
            };
            let parent = opened.dir.fd();
            match open_beneath(parent, p.name, DIR_READ_OFLAGS) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::XDEV) => return Err(refused(raw, TRAVERSES_SYMLINK)),
                Err(Errno::NOTDIR) if is_symlink_at(parent, p.name) => {
                    return Err(refused(raw, TRAVERSES_SYMLINK))
                }
                Err(e) => return Err(fail(OP, self.abs(rel_dir), e)),
            }
        };
        Ok(Some(fd))
    }
}

/// `linkat` of an open file (an unnamed one) to `name` in `dir`. Through
/// `AT_EMPTY_PATH` where the kernel allows it to this process (6.10 and
/// later for the file's opener, else with CAP_DAC_READ_SEARCH), else
/// through its `/proc/self/fd` link, which needs neither.
fn link_fd<P: rustix::path::Arg + Copy>(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: P,
) -> Result<(), Errno> {
    match rustix::fs::linkat(fd, c"", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => link_by_proc(fd, dir, name),
        done => done,
    }
}

/// `linkat` of an open file through its `/proc/self/fd` link.
fn link_by_proc<P: rustix::path::Arg>(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: P,
) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc.as_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
}

/// Whether a failure to make or link an unnamed file says the filesystem
/// or the kernel cannot (rather than that the disk is full, say).
fn unnamed_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOENT | Errno::PERM | Errno::ACCESS
    )
}

/// Unnamed staged files this process may hold at once: a quarter of its
/// descriptor limit, at most [`UNNAMED_STAGED_MAX`].
fn unnamed_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        usize::try_from(soft / 4).map_or(UNNAMED_STAGED_MAX, |n| n.min(UNNAMED_STAGED_MAX))
    })
}

/// Takes one of the process's places for an unnamed staged file, if one
/// is free.
fn reserve_unnamed() -> bool {
    UNNAMED_HELD
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            (held < unnamed_budget()).then_some(held + 1)
        })
        .is_ok()
}

/// Creates (0700) and opens one of our internal directories; refuses a symlink there.
fn internal_dir(base: BorrowedFd<'_>, name: &[u8], internal: &Path) -> Result<OwnedFd, FsError> {
    let shown = || internal.join(OsStr::from_bytes(name));
    match rustix::fs::mkdirat(base, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {
            let fd =
                open_beneath(base, b".", DIR_READ_OFLAGS).map_err(|e| fail("fsync", shown(), e))?;
            rustix::fs::fsync(&fd).map_err(|e| fail("fsync", shown(), e))?;
        }
        Err(Errno::EXIST) => {}
        Err(e) => return Err(fail("create internal dir", shown(), e)),
    }
    match open_beneath(base, name, WALK_OFLAGS) {
        Ok(fd) => Ok(fd),
        Err(Errno::LOOP | Errno::XDEV) => Err(refused(name, TRAVERSES_SYMLINK)),
        Err(Errno::NOTDIR) if is_symlink_at(base, name) => Err(refused(name, TRAVERSES_SYMLINK)),
        Err(e) => Err(fail("open internal dir", shown(), e)),
    }
}
