//! Genuine conflicts: versions a former primary held that the new primary
//! never had (changed on the old primary inside the replication lag window).
//!
//! The replica keeps such a version aside (never overwritten, never
//! deleted) and hands it to the primary, where the users are: there
//! `hasync conflicts list` shows it and `hasync conflicts restore` puts it
//! back into the live tree as a new file (for a Maildir message: a new
//! name in `new/`, so the IMAP server gives it a new UID). Until the
//! primary acknowledges it, a copy stays on the replica and is handed over
//! again at the next session.
//!
//! Layout, in a store's internal directory (outside the live tree, on its
//! filesystem): `conflicts/<slot>/<original path>`, one version per slot.
//! The primary names a slot `<kept unix seconds>-<first 16 hex digits of
//! the content hash>`, so a version handed over twice lands once; the
//! replica names its own `<unix seconds>-<counter>`.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::fsops::CONFLICTS_DIR;
use crate::wire::sync::Meta;

/// One version kept aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// `<store>/<slot>/<path>`: what `hasync conflicts restore` takes.
    pub id: String,
    pub store: String,
    /// Where it was in the store.
    pub path: String,
    pub size: u64,
    /// When it was kept aside (unix seconds).
    pub kept_at: i64,
    /// The file itself.
    #[serde(skip)]
    pub file: PathBuf,
}

fn conflicts_dir(internal: &Path) -> PathBuf {
    internal.join(CONFLICTS_DIR)
}

/// When the version in slot `name` was kept aside (unix seconds): the
/// number before the slot name's first `-`, as both the replica's
/// `<secs>-<counter>` and the primary's `<kept_at>-<hash16>` begin.
pub fn slot_time(name: &[u8]) -> Option<i64> {
    std::str::from_utf8(name)
        .ok()?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// When the version kept at `file` (a path below `internal`'s conflicts
/// directory) was kept aside: its slot's time.
pub fn kept_at_of(internal: &Path, file: &Path) -> Option<i64> {
    slot_time(slot_of(internal, file)?.as_bytes())
}

/// The name of the slot that holds `file` (a path below `internal`'s
/// conflicts directory).
pub fn slot_of(internal: &Path, file: &Path) -> Option<String> {
    Some(slot_and_rel(internal, file)?.0)
}

/// The slot that holds `file` and its path in the slot.
pub fn slot_and_rel(internal: &Path, file: &Path) -> Option<(String, PathBuf)> {
    let below = file.strip_prefix(conflicts_dir(internal)).ok()?;
    let mut parts = below.iter();
    let slot = parts.next()?.to_str()?.to_owned();
    Some((slot, parts.as_path().to_path_buf()))
}

/// Slots tried for one version before giving up (another version already
/// at its path in the first: a 64-bit collision of the content hash's
/// prefix, or an operator's copy).
const SLOT_TRIES_MAX: u32 = 16;

/// What a conflicts directory holds, by the time each version was kept
/// and its path: the slots [`kept_already`] looks through for a version
/// handed over, read once a session (not once a version: thousands of
/// versions handed over after a long partition, most kept aside within the
/// same few seconds, would each read a directory of thousands of slots and
/// try a path in every slot of their second).
#[derive(Debug, Default)]
pub struct SlotNames {
    by_version: std::collections::HashMap<(i64, PathBuf), Vec<String>>,
}

impl SlotNames {
    /// From (slot, path in it) pairs (dot files, in-progress hand-overs,
    /// and names without a time left out).
    pub fn new(held: impl IntoIterator<Item = (String, PathBuf)>) -> SlotNames {
        let mut out = SlotNames::default();
        for (slot, rel) in held {
            out.add(slot, rel);
        }
        out
    }

    /// Reads `internal`'s conflicts directory (nothing when it does not
    /// exist yet): every slot and the paths below it, byte-exact.
    pub fn read(internal: &Path) -> io::Result<SlotNames> {
        let Some(rd) = read_slots(internal)? else {
            return Ok(SlotNames::default());
        };
        let mut out = SlotNames::default();
        for e in rd {
            let e = e?;
            let Some(slot) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if slot.starts_with('.') || !e.file_type()?.is_dir() {
                continue;
            }
            let mut stack = vec![e.path()];
            while let Some(d) = stack.pop() {
                for f in std::fs::read_dir(&d)? {
                    let f = f?;
                    let path = f.path();
                    if f.file_type()?.is_dir() {
                        stack.push(path);
                    } else if let Ok(rel) = path.strip_prefix(e.path()) {
                        out.add(slot.clone(), rel.to_path_buf());
                    }
                }
            }
        }
        Ok(out)
    }

    /// A version kept since the directory was read: `rel` in `slot`.
    pub fn add(&mut self, slot: String, rel: PathBuf) {
        if slot.starts_with('.') {
            return;
        }
        if let Some(t) = slot_time(slot.as_bytes()) {
            let of = self.by_version.entry((t, rel)).or_default();
            if !of.contains(&slot) {
                of.push(slot);
            }
        }
    }

    /// The slots of time `t` that hold something at `rel`.
    pub fn holding(&self, t: i64, rel: &Path) -> impl Iterator<Item = &str> {
        self.by_version
            .get(&(t, rel.to_path_buf()))
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

/// The name of the slot the primary keeps a version handed over in.
pub fn primary_slot(kept_at: i64, hash: u128) -> String {
    format!("{kept_at}-{:016x}", (hash >> 64) as u64)
}

/// Whether a version kept aside at `kept_at`, of content `hash`, is kept
/// already among `slots` (slot names; `held(slot)`: the hash of what that
/// slot holds at the version's path, if anything): a slot of the same
/// time holds its path with that content. That is the primary's own slot
/// when it was handed over before, or the node's own slot from when it kept
/// the version aside itself, as a replica, and handed it to the peer (a
/// version handed back after a second failover).
pub fn kept_already<'s>(
    kept_at: i64,
    hash: u128,
    slots: impl IntoIterator<Item = &'s str>,
    mut held: impl FnMut(&str) -> Option<u128>,
) -> bool {
    slots
        .into_iter()
        .filter(|s| !s.starts_with('.') && slot_time(s.as_bytes()) == Some(kept_at))
        .any(|s| held(s) == Some(hash))
}

/// The slots of `internal`'s conflicts directory; `None` before it exists.
fn read_slots(internal: &Path) -> io::Result<Option<std::fs::ReadDir>> {
    match std::fs::read_dir(conflicts_dir(internal)) {
        Ok(rd) => Ok(Some(rd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Visits every version kept aside in an internal directory: `visit(slot
/// name, slot path, kept at (unix seconds), the version's entry)`.
/// In-progress hand-overs (dot files) are skipped.
fn each_kept(
    internal: &Path,
    mut visit: impl FnMut(&[u8], &Path, i64, &std::fs::DirEntry) -> io::Result<()>,
) -> io::Result<()> {
    let Some(slots) = read_slots(internal)? else {
        return Ok(());
    };
    for slot in slots {
        let slot = slot?;
        let name = slot.file_name();
        let name_b = name.as_bytes();
        if name_b.starts_with(b".") || !slot.file_type()?.is_dir() {
            continue;
        }
        let kept_at = slot_time(name_b).unwrap_or(0);
        let root = slot.path();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let ft = e.file_type()?;
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() || ft.is_symlink() {
                    visit(name_b, &root, kept_at, &e)?;
                }
            }
        }
    }
    Ok(())
}

/// Every version kept aside in `store`'s internal directory, oldest first.
pub fn list(store: &str, internal: &Path) -> io::Result<Vec<Conflict>> {
    let mut out = Vec::new();
    each_kept(internal, |slot, root, kept_at, e| {
        let file = e.path();
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let path = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
        out.push(Conflict {
            id: format!("{store}/{}/{path}", String::from_utf8_lossy(slot)),
            store: store.to_string(),
            size: std::fs::symlink_metadata(&file)?.len(),
            path,
            kept_at,
            file,
        });
        Ok(())
    })?;
    out.sort_by(|a, b| (a.kept_at, &a.id).cmp(&(b.kept_at, &b.id)));
    Ok(out)
}

/// How many versions are kept aside in `store`'s internal directory, and
/// when the oldest of them was kept (unix seconds); what [`list`] would
/// return, counted without holding it.
pub fn summary(internal: &Path) -> io::Result<(u64, Option<i64>)> {
    let (mut count, mut oldest) = (0u64, None::<i64>);
    each_kept(internal, |_, _, kept_at, _| {
        count += 1;
        oldest = Some(oldest.map_or(kept_at, |o| o.min(kept_at)));
        Ok(())
    })?;
    Ok((count, oldest))
}

/// Removes a kept version and the folders it leaves empty, up to its slot.
pub fn remove(internal: &Path, file: &Path) -> io::Result<()> {
    std::fs::remove_file(file)?;
    let top = conflicts_dir(internal);
    let mut d = file.parent();
    while let Some(dir) = d {
        if dir == top || !dir.starts_with(&top) || std::fs::remove_dir(dir).is_err() {
            break;
        }
        d = dir.parent();
    }
    std::fs::File::open(&top)?.sync_all()
}

/// A version a former primary hands over, as its `ConflictFile` announces
/// it.
#[derive(Debug, Clone)]
pub struct Handed {
    /// The hand-over's number in its session (what the acknowledgement
    /// names).
    pub id: u64,
    pub store: usize,
    /// Where it was in the store.
    pub rel: PathBuf,
    pub meta: Meta,
    pub size: u64,
    pub hash: u128,
    /// When the former primary kept it aside (unix seconds).
    pub kept_at: i64,
}

/// Where the primary writes a version handed over to it as it arrives: a
/// file in the store's conflicts directory ([`Incoming`]), or the data-path
/// simulator's model of one.
pub trait Shelving {
    /// The hand-over's number ([`Handed::id`]).
    fn id(&self) -> u64;
    fn store(&self) -> usize;
    /// Appends content; `Ok(true)` once all of it arrived. More than
    /// announced is the peer's error (`InvalidData`); any other error is
    /// this node's (its disk), and the hand-over is given up.
    fn write(&mut self, bytes: &[u8]) -> io::Result<bool>;
    /// Bytes still to arrive.
    fn left(&self) -> u64;
    /// Checks the content against its hash and keeps it durably; where it
    /// is kept. Only then is the hand-over acknowledged.
    fn finish(self: Box<Self>) -> io::Result<PathBuf>;
}

/// A version being handed over to the primary, written into its slot; its
/// temporary file is removed unless it landed (given up, failed, or its
/// session ended first).
pub struct Incoming {
    id: u64,
    store: usize,
    rel: PathBuf,
    meta: Meta,
    size: u64,
    hash: u128,
    slot: PathBuf,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hasher: Xxh3,
    written: u64,
    landed: bool,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.landed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Incoming {
    /// Starts receiving `version` into `internal`'s conflicts directory;
    /// `Ok(None)` when the primary already holds it (handed over before,
    /// the acknowledgement lost) in one of the `slots` of its time (read
    /// with [`SlotNames`]): acknowledge it again.
    pub fn begin<'s>(
        internal: &Path,
        version: Handed,
        slots: impl IntoIterator<Item = &'s str>,
    ) -> io::Result<Option<Incoming>> {
        let Handed {
            id,
            store,
            rel,
            meta,
            size,
            hash,
            kept_at,
        } = version;
        let dir = conflicts_dir(internal);
        std::fs::create_dir_all(&dir)?;
        let dir_fd = rustix::fs::open(
            &dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let unsynced = std::cell::Cell::new(None);
        let held = |slot: &str| -> Option<u128> {
            // Only a regular file counts, reached through no symlink (a
            // folder kept aside as a symlink must not lead into the store),
            // and nothing else (a fifo) may block the open.
            let at = Path::new(slot).join(&rel);
            let fd = super::fsops::open_beneath(
                dir_fd.as_fd(),
                at.as_os_str().as_bytes(),
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::NONBLOCK
                    | rustix::fs::OFlags::CLOEXEC,
            )
            .ok()?;
            let f = std::fs::File::from(fd);
            let meta = f.metadata().ok()?;
            if !meta.is_file() || meta.len() != size {
                return None;
            }
            let found = super::tree::hash_file(f.try_clone().ok()?).ok()?;
            if found == hash {
                // Acknowledged as kept: durable first (its landing's
                // directory flush may have failed).
                let synced = f.sync_all().and_then(|()| {
                    let file = dir.join(&at);
                    for d in file.ancestors().skip(1) {
                        std::fs::File::open(d)?.sync_all()?;
                        if d == dir {
                            break;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = synced {
                    unsynced.set(Some(e));
                }
            }
            Some(found)
        };
        if kept_already(kept_at, hash, slots, held) {
            if let Some(e) = unsynced.take() {
                return Err(e);
            }
            return Ok(None);
        }
        let slot = dir.join(primary_slot(kept_at, hash));
        let tmp = dir.join(format!(".incoming-{id}"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        Ok(Some(Incoming {
            id,
            store,
            rel,
            meta,
            size,
            hash,
            slot,
            tmp,
            file: Some(file),
            hasher: Xxh3::new(),
            written: 0,
            landed: false,
        }))
    }

    pub fn is_complete(&self) -> bool {
        self.written == self.size
    }
}

impl Shelving for Incoming {
    fn id(&self) -> u64 {
        self.id
    }

    fn store(&self) -> usize {
        self.store
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<bool> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more content than announced",
            ));
        }
        if crate::failpoint::fails("conflicts.write_enospc") {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOSPC.raw_os_error(),
            ));
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(bytes)?;
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(self.written == self.size)
    }

    fn left(&self) -> u64 {
        self.size - self.written
    }

    /// Checks the content, applies mode (special bits dropped: it goes back
    /// into a live tree one day) and mtime, makes it durable under its slot.
    fn finish(mut self: Box<Self>) -> io::Result<PathBuf> {
        let file = self.file.take().expect("finished once");
        if self.hasher.digest128() != self.hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "content does not match its hash",
            ));
        }
        rustix::fs::fchmod(
            file.as_fd(),
            rustix::fs::Mode::from_raw_mode(self.meta.mode & 0o777),
        )?;
        let t = rustix::fs::Timespec {
            tv_sec: self.meta.mtime_sec,
            tv_nsec: i64::from(self.meta.mtime_nsec),
        };
        rustix::fs::futimens(
            file.as_fd(),
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
        )?;
        file.sync_all()?;
        drop(file);
        // Never over another version: the next slot of the same time then.
        let mut slot = self.slot.clone();
        let mut n = 0;
        let (dest, parent) = loop {
            let dest = slot.join(&self.rel);
            let parent = dest.parent().unwrap_or(&slot).to_path_buf();
            std::fs::create_dir_all(&parent)?;
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                &self.tmp,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    self.landed = true;
                    break (dest, parent);
                }
                Err(rustix::io::Errno::EXIST) if n + 1 < SLOT_TRIES_MAX => {
                    n += 1;
                    let mut name = self.slot.file_name().unwrap_or_default().to_os_string();
                    name.push(format!("-{n}"));
                    slot = self.slot.with_file_name(name);
                }
                Err(e) => return Err(e.into()),
            }
        };
        for d in parent.ancestors() {
            std::fs::File::open(d)?.sync_all()?;
            if d == slot.parent().unwrap_or(&slot) {
                break;
            }
        }
        Ok(dest)
    }
}

/// Where a restored version goes in the live tree: a Maildir message gets a
/// new name in its folder's `new/` (a new message to the IMAP server, with
/// a new UID); anything else goes beside its old name.
fn restore_target(c: &Conflict, root: &Path, n: u32) -> PathBuf {
    let rel = Path::new(&c.path);
    let in_maildir = rel
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|d| d == "cur" || d == "new");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if in_maildir {
        let folder = rel
            .parent()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new(""));
        root.join(folder).join("new").join(format!(
            "{}.M{}P{}Q{n}.hasync-restored",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id()
        ))
    } else {
        let slot = c.id.split('/').nth(1).unwrap_or("restored");
        let mut name = rel.as_os_str().to_os_string();
        name.push(format!(
            ".restored-{slot}{}",
            if n > 0 {
                format!("-{n}")
            } else {
                String::new()
            }
        ));
        root.join(name)
    }
}

/// Puts a kept version back into the live tree under `root` as a new file
/// (never over an existing one), durably; returns where it went.
pub fn restore(c: &Conflict, internal: &Path, root: &Path) -> io::Result<PathBuf> {
    for n in 0..100 {
        let to = restore_target(c, root, n);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Same filesystem (checked at start): one atomic rename that never
        // replaces an existing name, and that the change tracker sees as a
        // file moved in.
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &c.file,
            rustix::fs::CWD,
            &to,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                if let Some(parent) = to.parent() {
                    std::fs::File::open(parent)?.sync_all()?;
                }
                // The slot's folders it leaves empty.
                let top = conflicts_dir(internal);
                let mut d = c.file.parent();
                while let Some(dir) = d {
                    if dir == top || !dir.starts_with(&top) || std::fs::remove_dir(dir).is_err() {
                        break;
                    }
                    d = dir.parent();
                }
                std::fs::File::open(&top)?.sync_all()?;
                return Ok(to);
            }
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("no free name to restore to"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            mode: 0o4640,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
        }
    }

    fn handed(id: u64, rel: &str, size: u64, hash: u128, kept_at: i64) -> Handed {
        Handed {
            id,
            store: 0,
            rel: rel.into(),
            meta: meta(),
            size,
            hash,
            kept_at,
        }
    }

    fn hand_over(
        internal: &Path,
        id: u64,
        rel: &str,
        body: &[u8],
        kept_at: i64,
    ) -> Option<PathBuf> {
        let hash = xxhash_rust::xxh3::xxh3_128(body);
        let slots = SlotNames::read(internal).unwrap();
        let mut inc = Box::new(
            Incoming::begin(
                internal,
                handed(id, rel, body.len() as u64, hash, kept_at),
                slots.holding(kept_at, Path::new(rel)),
            )
            .unwrap()?,
        );
        for chunk in body.chunks(3) {
            inc.write(chunk).unwrap();
        }
        assert!(inc.is_complete());
        Some(inc.finish().unwrap())
    }

    #[test]
    fn handed_over_versions_are_listed_once_and_restored_as_new_messages() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let (internal, root) = (d.path().join("internal"), d.path().join("store"));
        std::fs::create_dir_all(root.join("u/Maildir/cur")).unwrap();
        let kept = hand_over(
            &internal,
            1,
            "u/Maildir/cur/1.M1.host:2,S",
            b"late mail",
            1_700_000_100,
        )
        .unwrap();
        assert!(
            hand_over(
                &internal,
                2,
                "u/Maildir/cur/1.M1.host:2,S",
                b"late mail",
                1_700_000_100
            )
            .is_none(),
            "twice is once"
        );
        hand_over(
            &internal,
            3,
            "u/Maildir/dovecot-uidlist",
            b"3 V1 N9\n",
            1_700_000_000,
        )
        .unwrap();
        let md = std::fs::metadata(&kept).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.mtime()),
            (0o640, 1_700_000_000),
            "special bits dropped"
        );
        let all = list("inbox", &internal).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].path, "u/Maildir/dovecot-uidlist", "oldest first");
        assert_eq!(
            summary(&internal).unwrap(),
            (2, Some(all[0].kept_at)),
            "the count status shows"
        );
        assert_eq!(all[1].size, 9);
        assert!(all[1].id.starts_with("inbox/1700000100-"), "{}", all[1].id);
        // Restored as a new message in new/, never over anything.
        let to = restore(&all[1], &internal, &root).unwrap();
        assert_eq!(to.parent().unwrap(), root.join("u/Maildir/new"));
        assert_eq!(std::fs::read(&to).unwrap(), b"late mail");
        let to2 = restore(&all[0], &internal, &root).unwrap();
        assert!(
            to2.to_string_lossy().contains("dovecot-uidlist.restored-"),
            "{}",
            to2.display()
        );
        assert!(list("inbox", &internal).unwrap().is_empty());
        assert_eq!(summary(&internal).unwrap(), (0, None));
        assert_eq!(
            std::fs::read_dir(internal.join(CONFLICTS_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    /// A node that kept a version aside as a replica and handed it over
    /// (the acknowledgement lost) may be handed it back after a second
    /// failover, from the peer's slot of another name: kept once.
    #[test]
    fn a_version_handed_back_to_the_node_that_kept_it_is_kept_once() {
        let d = tempfile::tempdir().unwrap();
        let internal = d.path().join("internal");
        let own = internal
            .join(CONFLICTS_DIR)
            .join("1700000100-0")
            .join("cur/m");
        std::fs::create_dir_all(own.parent().unwrap()).unwrap();
        std::fs::write(&own, b"late mail").unwrap();
        assert!(
            hand_over(&internal, 1, "cur/m", b"late mail", 1_700_000_100).is_none(),
            "kept already, in the node's own slot"
        );
        // A symlink or a fifo at the path in a slot of that time is no copy
        // of it (and is not followed or opened blocking).
        let odd = internal.join(CONFLICTS_DIR).join("1700000200-0");
        std::fs::create_dir_all(odd.join("cur")).unwrap();
        std::os::unix::fs::symlink(&own, odd.join("cur/m")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            odd.join("cur/f").as_path(),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(hand_over(&internal, 4, "cur/m", b"late mail", 1_700_000_200).is_some());
        assert!(hand_over(&internal, 5, "cur/f", b"late mail", 1_700_000_200).is_some());
        // Nor is a copy reached through a folder kept aside as a symlink
        // (into the live tree, where users may change it).
        let live = d.path().join("store/u/cur");
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(live.join("m"), b"late mail").unwrap();
        let linked = internal.join(CONFLICTS_DIR).join("1700000300-0");
        std::fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink(d.path().join("store/u"), linked.join("u")).unwrap();
        assert!(hand_over(&internal, 6, "u/cur/m", b"late mail", 1_700_000_300).is_some());
        // Other content, or the same kept at another time, is another version.
        assert!(hand_over(&internal, 2, "cur/m", b"late mail 2", 1_700_000_100).is_some());
        assert!(hand_over(&internal, 3, "cur/m", b"late mail", 1_700_000_101).is_some());
        // Four handed over, one of the node's own, and the two symlinks
        // (listed as what was kept aside there).
        assert_eq!(list("s", &internal).unwrap().len(), 8);
    }

    /// Another version at the path in the slot named for this one (a
    /// collision of the hash's prefix, or an operator's copy) is never
    /// replaced: the version goes to the next slot of its time.
    #[test]
    fn a_version_never_replaces_another_in_its_slot() {
        let d = tempfile::tempdir().unwrap();
        let internal = d.path().join("internal");
        let hash = xxhash_rust::xxh3::xxh3_128(b"late mail");
        let taken = internal
            .join(CONFLICTS_DIR)
            .join(primary_slot(1_700_000_100, hash))
            .join("cur/m");
        std::fs::create_dir_all(taken.parent().unwrap()).unwrap();
        std::fs::write(&taken, b"other").unwrap();
        let kept = hand_over(&internal, 1, "cur/m", b"late mail", 1_700_000_100).unwrap();
        assert_ne!(kept, taken);
        assert_eq!(std::fs::read(&taken).unwrap(), b"other");
        assert_eq!(std::fs::read(&kept).unwrap(), b"late mail");
        assert_eq!(kept_at_of(&internal, &kept), Some(1_700_000_100));
        assert_eq!(list("s", &internal).unwrap().len(), 2);
        // And handed over again, it is found there.
        assert!(hand_over(&internal, 2, "cur/m", b"late mail", 1_700_000_100).is_none());
    }

    #[test]
    fn slots_are_found_by_the_time_and_path_they_hold() {
        let held = |slot: &str, rel: &str| (slot.to_owned(), PathBuf::from(rel));
        let mut names = SlotNames::new([
            held("17-1", "cur/m"),
            held("17-00ff", "cur/m"),
            held("17-2", "cur/n"),
            held("18-2", "cur/m"),
            held(".incoming-4", "cur/m"),
            held("stray", "cur/m"),
        ]);
        names.add("17-3".into(), "cur/m".into());
        names.add("17-3".into(), "cur/m".into());
        fn of<'a>(n: &'a SlotNames, t: i64, rel: &str) -> Vec<&'a str> {
            n.holding(t, Path::new(rel)).collect()
        }
        assert_eq!(of(&names, 17, "cur/m"), ["17-1", "17-00ff", "17-3"]);
        assert_eq!(of(&names, 17, "cur/n"), ["17-2"]);
        assert_eq!(of(&names, 18, "cur/m"), ["18-2"]);
        assert!(of(&names, 19, "cur/m").is_empty());
        let d = tempfile::tempdir().unwrap();
        assert!(
            of(&SlotNames::read(d.path()).unwrap(), 17, "cur/m").is_empty(),
            "no directory yet"
        );
        // Read from a directory: byte-exact paths below each slot.
        let rel = Path::new(std::ffi::OsStr::from_bytes(b"u/cur/\xff"));
        let f = d.path().join(CONFLICTS_DIR).join("17-1").join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"x").unwrap();
        let read = SlotNames::read(d.path()).unwrap();
        assert_eq!(read.holding(17, rel).collect::<Vec<_>>(), ["17-1"]);
        assert_eq!(
            slot_and_rel(d.path(), &f),
            Some(("17-1".into(), rel.to_path_buf()))
        );
    }

    #[test]
    fn the_time_a_version_was_kept_is_its_slots() {
        assert_eq!(slot_time(b"1700000100-7"), Some(1_700_000_100));
        let slot = primary_slot(1_700_000_100, u128::MAX);
        assert_eq!(slot, "1700000100-ffffffffffffffff");
        assert_eq!(slot_time(slot.as_bytes()), Some(1_700_000_100));
        assert_eq!(slot_time(b".incoming-3"), None);
        let internal = Path::new("/i");
        let kept = internal.join(CONFLICTS_DIR).join("17-2/cur/m");
        assert_eq!(kept_at_of(internal, &kept), Some(17));
        assert_eq!(kept_at_of(internal, Path::new("/elsewhere/17-2/m")), None);
    }

    #[test]
    fn content_that_does_not_match_its_hash_is_not_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut inc = Box::new(
            Incoming::begin(d.path(), handed(1, "a", 3, 7, 1), [])
                .unwrap()
                .unwrap(),
        );
        inc.write(b"abc").unwrap();
        assert!(inc.finish().is_err());
        assert!(list("s", d.path()).unwrap().is_empty());
        let mut inc = Box::new(
            Incoming::begin(d.path(), handed(2, "a", 2, 7, 1), [])
                .unwrap()
                .unwrap(),
        );
        assert!(inc.write(b"abc").is_err(), "more than announced");
    }

    #[test]
    fn a_hand_over_given_up_or_refused_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = conflicts_dir(d.path());
        let leftovers = || -> Vec<_> {
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        // Cut short (the session ended, or this node's disk refused a write).
        let hash = xxhash_rust::xxh3::xxh3_128(b"abcdef");
        let mut inc = Incoming::begin(d.path(), handed(1, "a", 6, hash, 1), [])
            .unwrap()
            .unwrap();
        assert!(!inc.write(b"abc").unwrap());
        assert_eq!(inc.left(), 3);
        assert_eq!(leftovers().len(), 1, "the temporary file while it arrives");
        drop(inc);
        assert!(leftovers().is_empty(), "{:?}", leftovers());
        // Refused at the end (its content not what was announced).
        let mut inc = Box::new(
            Incoming::begin(d.path(), handed(2, "a", 6, hash, 1), [])
                .unwrap()
                .unwrap(),
        );
        assert!(inc.write(b"abcdeX").unwrap());
        assert!(inc.finish().is_err());
        assert!(leftovers().is_empty(), "{:?}", leftovers());
        // Kept: only its slot.
        let kept = hand_over(d.path(), 3, "a", b"abcdef", 1).unwrap();
        assert_eq!(leftovers(), [kept.parent().unwrap().file_name().unwrap()]);
    }
}
