//! A replicated tree reached through its root's descriptor.
//!
//! Every lookup is one `*at` call relative to the root's descriptor with the
//! path relative to the root, so how long the root's own path is never
//! matters, and neither does depth: what bounds a path is
//! [`REL_PATH_BYTES_MAX`], the longest path one system call takes. A path
//! longer than that is out of reach: it is not replicated, and the caller
//! raises an alarm naming it while the rest of the store goes on.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
use xxhash_rust::xxh3::Xxh3;

use super::index::{self, Kind, Stat};

/// Longest path, relative to a store's root, that is replicated (what one
/// system call takes: `PATH_MAX` less its terminating NUL).
pub const REL_PATH_BYTES_MAX: usize = 4095;

/// Whether `rel` is within [`REL_PATH_BYTES_MAX`].
pub fn fits(rel: &Path) -> bool {
    rel.as_os_str().len() <= REL_PATH_BYTES_MAX
}

/// A path too long to replicate, shortened for a log line or an alarm.
pub fn describe_too_long(store: &str, rel: &Path) -> String {
    let raw = rel.as_os_str().as_bytes();
    let head = String::from_utf8_lossy(&raw[..raw.len().min(120)]);
    format!(
        "path too long to replicate in store {store}: {head}… ({} bytes; the limit is {REL_PATH_BYTES_MAX} bytes below the store's root, PATH_MAX 4096 with its NUL); it stays on this node only",
        raw.len()
    )
}

/// Paths already reported as out of reach: each is an alarm once (per
/// session), however often a scan or an event finds it again.
#[derive(Debug, Default)]
pub struct OutOfReach {
    seen: std::collections::HashSet<(String, PathBuf)>,
}

/// Distinct paths remembered; past that, one last alarm says so.
const OUT_OF_REACH_MAX: usize = 1024;

impl OutOfReach {
    pub fn report(&mut self, stats: &super::stats::ReplStats, store: &str, rel: &Path) {
        if self.seen.len() > OUT_OF_REACH_MAX {
            return;
        }
        let line = if self.seen.len() == OUT_OF_REACH_MAX {
            format!("more than {OUT_OF_REACH_MAX} paths too long to replicate; not reporting more")
        } else if self.seen.insert((store.to_string(), rel.to_path_buf())) {
            describe_too_long(store, rel)
        } else {
            return;
        };
        if self.seen.len() == OUT_OF_REACH_MAX {
            self.seen.insert((String::new(), PathBuf::new()));
        }
        tracing::error!(alarm = true, "ALARM: {line}");
        stats.raise_alarm(line);
    }
}

fn too_long(rel: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "path of {} bytes exceeds {REL_PATH_BYTES_MAX}",
            rel.as_os_str().len()
        ),
    )
}

/// Called with a folder's path before a walk reads the folder (see
/// [`Tree::read_folders_after`]).
pub type FolderGate = std::sync::Arc<dyn Fn(&Path) + Send + Sync>;

/// The root of a store, opened once.
pub struct Tree {
    path: PathBuf,
    fd: OwnedFd,
    gate: Option<FolderGate>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("path", &self.path)
            .field("fd", &self.fd)
            .field("gated", &self.gate.is_some())
            .finish()
    }
}

impl Tree {
    /// Opens the root (following symlinks in the configured path: that is
    /// operator configuration).
    pub fn open(path: &Path) -> io::Result<Tree> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree {
            path: path.to_path_buf(),
            fd,
            gate: None,
        })
    }

    /// Walks of this tree wait on `gate` before they read each folder:
    /// the primary's tracker watches the folders as the walk goes, and a
    /// change in a folder the walk read before its watch would go unseen.
    pub fn read_folders_after(&mut self, gate: FolderGate) {
        self.gate = Some(gate);
    }

    /// A tree over an already open root descriptor.
    pub fn from_fd(path: &Path, fd: OwnedFd) -> Tree {
        Tree {
            path: path.to_path_buf(),
            fd,
            gate: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The absolute path, for messages (and for callers that can use it:
    /// see [`Tree::io_path`]).
    pub fn abs(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// The absolute path if one system call takes it; `None` when only the
    /// root's descriptor reaches `rel`.
    pub fn io_path(&self, rel: &Path) -> Option<PathBuf> {
        let abs = self.abs(rel);
        (abs.as_os_str().len() <= REL_PATH_BYTES_MAX).then_some(abs)
    }

    fn arg(rel: &Path) -> io::Result<&Path> {
        if !fits(rel) {
            return Err(too_long(rel));
        }
        Ok(if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        })
    }

    /// lstat of `rel`; `Ok(None)` when it does not exist (or is not a
    /// file, folder or symlink).
    pub fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        index::stat_of(rustix::fs::statx(
            &self.fd,
            Self::arg(rel)?,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS,
        ))
    }

    /// Opens the file at `rel` for reading, never following a symlink as
    /// its last component.
    pub fn open_read(&self, rel: &Path) -> io::Result<std::fs::File> {
        let fd = rustix::fs::openat(
            &self.fd,
            Self::arg(rel)?,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(std::fs::File::from(fd))
    }

    /// A symlink's target, as bytes.
    pub fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let target = rustix::fs::readlinkat(&self.fd, Self::arg(rel)?, Vec::new())?;
        Ok(target.into_bytes())
    }

    /// Opens the directory at `rel` for listing.
    pub fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.fd,
            Self::arg(rel)?,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Hashes a file's content or a symlink's target (0 for a folder).
    pub fn hash(&self, rel: &Path, kind: Kind) -> io::Result<u128> {
        match kind {
            Kind::Dir => Ok(0),
            Kind::Symlink => Ok(index::hash_bytes(&self.read_link(rel)?)),
            Kind::File => hash_file(self.open_read(rel)?),
        }
    }
}

/// What the sender's decisions read of a local store: the real [`Tree`],
/// or a simulated one (the data-path simulator). Every lookup is by path
/// relative to the store's root.
pub trait LocalTree {
    /// The absolute path, for messages.
    fn abs(&self, rel: &Path) -> PathBuf;
    /// lstat of `rel`; `Ok(None)` when it does not exist.
    fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>>;
    /// A symlink's target, as bytes.
    fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>>;
    /// Hashes a file's content or a symlink's target (0 for a folder).
    fn hash(&self, rel: &Path, kind: Kind) -> io::Result<u128>;
    /// The names in the folder at `rel`.
    fn list(&self, rel: &Path) -> io::Result<Vec<std::ffi::OsString>>;
    /// A folder open for a walk ([`super::walk::Walk`]).
    type Folder;
    /// Opens the folder at `rel`; `Ok(None)` when it is gone or no longer
    /// a folder.
    fn open_folder(&self, rel: &Path) -> io::Result<Option<Self::Folder>>;
    /// The folder's entries with their lstat (`.` and `..`, entries gone
    /// meanwhile and other kinds than file, folder and symlink left out).
    fn read_folder(
        &self,
        folder: &Self::Folder,
        rel: &Path,
    ) -> io::Result<Vec<super::walk::Listed>>;
    /// Hashes the entry `name` of the folder at `rel` (see
    /// [`LocalTree::hash`]); `from_disk` drops its cached pages first.
    fn hash_in(
        &self,
        folder: &Self::Folder,
        rel: &Path,
        name: &std::ffi::OsStr,
        kind: Kind,
        from_disk: bool,
    ) -> io::Result<u128>;
    /// The slots of the conflicts directory in the store's own directory
    /// `internal` (outside this tree, on its filesystem).
    fn shelf_slots(&self, internal: &Path) -> io::Result<super::conflicts::SlotNames>;
    /// Starts keeping a version a former primary hands over there;
    /// `Ok(None)` when it is kept already in one of `slots` (those of its
    /// time).
    fn shelve<'s>(
        &self,
        internal: &Path,
        version: super::conflicts::Handed,
        slots: Box<dyn Iterator<Item = &'s str> + 's>,
    ) -> io::Result<Option<Box<dyn super::conflicts::Shelving>>>;
}

impl LocalTree for Tree {
    fn abs(&self, rel: &Path) -> PathBuf {
        Tree::abs(self, rel)
    }
    fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        Tree::lstat(self, rel)
    }
    fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        Tree::read_link(self, rel)
    }
    fn hash(&self, rel: &Path, kind: Kind) -> io::Result<u128> {
        Tree::hash(self, rel, kind)
    }
    fn list(&self, rel: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        use std::os::unix::ffi::OsStrExt;
        let mut listing = rustix::fs::Dir::new(self.open_dir(rel)?)?;
        let mut names = Vec::new();
        while let Some(ent) = listing.read() {
            let ent = ent?;
            let name = ent.file_name();
            if name != c"." && name != c".." {
                names.push(std::ffi::OsStr::from_bytes(name.to_bytes()).to_os_string());
            }
        }
        Ok(names)
    }
    type Folder = OwnedFd;
    fn open_folder(&self, rel: &Path) -> io::Result<Option<OwnedFd>> {
        if let Some(gate) = &self.gate {
            gate(rel);
        }
        match self.open_dir(rel) {
            Ok(fd) => Ok(Some(fd)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
    fn read_folder(&self, folder: &OwnedFd, _rel: &Path) -> io::Result<Vec<super::walk::Listed>> {
        super::walk::read_real_folder(folder.as_fd())
    }
    fn hash_in(
        &self,
        folder: &OwnedFd,
        _rel: &Path,
        name: &std::ffi::OsStr,
        kind: Kind,
        from_disk: bool,
    ) -> io::Result<u128> {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
        index::hash_at(folder.as_fd(), &name, kind, from_disk)
    }
    fn shelf_slots(&self, internal: &Path) -> io::Result<super::conflicts::SlotNames> {
        super::conflicts::SlotNames::read(internal)
    }
    fn shelve<'s>(
        &self,
        internal: &Path,
        version: super::conflicts::Handed,
        slots: Box<dyn Iterator<Item = &'s str> + 's>,
    ) -> io::Result<Option<Box<dyn super::conflicts::Shelving>>> {
        Ok(super::conflicts::Incoming::begin(internal, version, slots)?
            .map(|i| Box::new(i) as Box<dyn super::conflicts::Shelving>))
    }
}

/// xxh3-128 of everything `f` reads.
pub fn hash_file(mut f: std::fs::File) -> io::Result<u128> {
    use std::io::Read;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` nested `d` folders under `root` (made by descriptor) with a
    /// file `f` at the bottom; returns its relative path.
    fn deep(root: &Path, depth: usize) -> PathBuf {
        let mut fd =
            rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, "d", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .unwrap();
            rel.push("d");
        }
        let f = rustix::fs::openat(
            &fd,
            "f",
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        rustix::io::write(&f, b"deep").unwrap();
        rel.push("f");
        rel
    }

    #[test]
    fn a_path_past_path_max_from_the_root_is_reached_through_the_root() {
        let dir = tempfile::tempdir().unwrap();
        // 2,046 levels: 4,093 bytes relative, past PATH_MAX with the root.
        let rel = deep(dir.path(), 2046);
        assert!(dir.path().join(&rel).as_os_str().len() > 4096);
        let t = Tree::open(dir.path()).unwrap();
        assert!(t.io_path(&rel).is_none());
        let st = t.lstat(&rel).unwrap().unwrap();
        assert_eq!((st.kind, st.version.size), (Kind::File, 4));
        assert_eq!(
            t.hash(&rel, Kind::File).unwrap(),
            index::hash_bytes(b"deep")
        );
        assert!(t.open_dir(rel.parent().unwrap()).is_ok());
        assert!(t.lstat(&rel.with_file_name("n")).unwrap().is_none());
    }

    #[test]
    fn a_path_past_the_limit_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tree::open(dir.path()).unwrap();
        let long = PathBuf::from("d/".repeat(2100));
        let e = t.lstat(&long).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(!fits(&long));
        let line = describe_too_long("inbox", &long);
        assert!(
            line.contains("4200 bytes") && line.contains("4095"),
            "{line}"
        );
    }
}
