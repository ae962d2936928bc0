//! Reading a node's stores ahead of the walks that need them at start.
//!
//! A node that restarts reads each store's metadata before it can compare:
//! a walk (the primary's takeover walk, the replica's scan) stats every
//! entry, one folder and one entry at a time, so on a cold cache it waits
//! for one read at a time, where the disk serves several at once far
//! faster: the cold metadata of a 200,000-file store took 2.6 s with one
//! reader and 1.2 s with four on the bench machine (virtio disk), of a
//! million-file store 12.9 s and 6.7 s.
//!
//! Warming runs [`WARM_THREADS`] threads over the same trees as a
//! restarted node starts: every folder's listing and every entry's inode,
//! in path order, the order the walks go in (the tracker lists its folders
//! several at a time itself). It keeps nothing it reads: the kernel's
//! caches hold it for the walks, which still read everything themselves.
//! So what warming finds decides nothing, and what it cannot read (a
//! folder gone meanwhile, a path too long) it skips. It holds only
//! the folders found and not yet read, at most [`PENDING_FOLDERS_MAX`]
//! (beyond that a folder is left to the walks, unwarmed), and stops when
//! it is done or the node stops.
//!
//! A daemon restarted without a reboot finds its stores' metadata cached
//! already: warming would then only take the CPU the walks need (on two
//! cores, a tenth of a restart's catch-up). So the first [`PROBE_FOLDERS`]
//! folders it reads are probed: if reading them fetched nothing from the
//! disk (each thread's own `read_bytes` in `/proc/thread-self/io`),
//! warming stops there. Where that cannot be read, warming goes on.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use tracing::debug;

use crate::model::Excludes;

/// Readers in flight: four served cold metadata 2.2 times as fast as one
/// here, eight no faster than four.
pub const WARM_THREADS: usize = 4;

/// Folders found and not yet read, at most (a path each: a few MB).
pub const PENDING_FOLDERS_MAX: usize = 65_536;

/// The first folders read are probed for reads from the disk; none: the
/// metadata is cached and warming stops.
pub const PROBE_FOLDERS: u64 = 32;

struct Work {
    /// By root, then path order (a folder before what is below it).
    pending: BTreeSet<(usize, PathBuf)>,
    /// Folders being read now.
    busy: usize,
    done: bool,
}

struct State {
    roots: Vec<OwnedFd>,
    excludes: Excludes,
    work: Mutex<Work>,
    wake: Condvar,
    stop: AtomicBool,
    folders: AtomicU64,
    entries: AtomicU64,
    /// Probed folders read so far, and whether any of them fetched from
    /// the disk (or could not be probed).
    probed: AtomicU64,
    fetched: AtomicBool,
    started: Instant,
}

/// Warming under way; stopped when dropped.
pub struct Warming {
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

impl Warming {
    /// Starts warming the trees at `roots` (each once; a root that cannot
    /// be opened is skipped: the tracker and the walks report it).
    pub fn start(roots: &[PathBuf], excludes: Excludes, threads: usize) -> Warming {
        let mut opened: Vec<OwnedFd> = Vec::new();
        // Each folder once, however it is named.
        let mut seen = BTreeSet::new();
        for root in roots {
            // A root may be a symlink (to the mail disk, say), as the
            // tracker and the walks allow; nothing below it is followed.
            let fd = match rustix::fs::open(root, dir_flags() - OFlags::NOFOLLOW, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) => {
                    debug!(root = %root.display(), "not warmed: {e}");
                    continue;
                }
            };
            let fresh = rustix::fs::fstat(&fd).is_ok_and(|st| seen.insert((st.st_dev, st.st_ino)));
            if fresh {
                opened.push(fd);
            }
        }
        let pending = (0..opened.len()).map(|r| (r, PathBuf::new())).collect();
        let state = Arc::new(State {
            roots: opened,
            excludes,
            work: Mutex::new(Work {
                pending,
                busy: 0,
                done: false,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            folders: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            probed: AtomicU64::new(0),
            fetched: AtomicBool::new(false),
            started: Instant::now(),
        });
        let threads = (0..threads)
            .filter_map(|i| {
                let state = state.clone();
                std::thread::Builder::new()
                    .name(format!("hasync-warm-{i}"))
                    .spawn(move || state.run())
                    .map_err(|e| debug!("a warming thread did not start: {e}"))
                    .ok()
            })
            .collect();
        Warming { state, threads }
    }

    /// Waits until every folder was read (or warming was stopped).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Folders read and entries stat'ed so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.folders.load(Relaxed),
            self.state.entries.load(Relaxed),
        )
    }
}

impl Drop for Warming {
    fn drop(&mut self) {
        self.state.stop.store(true, Relaxed);
        self.state.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl State {
    fn run(&self) {
        let mut io = IoCounter::open();
        while let Some((root, rel)) = self.next() {
            let probing = !self.fetched.load(Relaxed) && self.probed.load(Relaxed) < PROBE_FOLDERS;
            let before = if probing { io.read_bytes() } else { None };
            let found = self.read(root, &rel);
            if probing {
                self.probe(before, io.read_bytes());
            }
            self.finish(root, found);
        }
    }

    /// Counts a probed folder: fetched from the disk (or not known), or
    /// not; once [`PROBE_FOLDERS`] were read with nothing fetched, warming
    /// stops.
    fn probe(&self, before: Option<u64>, after: Option<u64>) {
        match (before, after) {
            (Some(b), Some(a)) if a == b => {}
            _ => {
                self.fetched.store(true, Relaxed);
                return;
            }
        }
        let probed = self.probed.fetch_add(1, Relaxed) + 1;
        if probed == PROBE_FOLDERS && !self.fetched.load(Relaxed) {
            debug!(
                folders = self.folders.load(Relaxed),
                ms = self.started.elapsed().as_millis() as u64,
                "the stores' metadata is cached already: warming stopped"
            );
            self.stop.store(true, Relaxed);
            self.wake.notify_all();
        }
    }

    /// The next folder to read, in path order; `None` once every folder
    /// was read or warming stops.
    fn next(&self) -> Option<(usize, PathBuf)> {
        let mut work = self.work.lock().expect("warm lock");
        loop {
            if self.stop.load(Relaxed) || work.done {
                return None;
            }
            if let Some(next) = work.pending.pop_first() {
                work.busy += 1;
                return Some(next);
            }
            if work.busy == 0 {
                // Done when nothing is pending or being read.
                work.done = true;
                self.wake.notify_all();
                debug!(
                    folders = self.folders.load(Relaxed),
                    entries = self.entries.load(Relaxed),
                    ms = self.started.elapsed().as_millis() as u64,
                    "stores warmed"
                );
                return None;
            }
            work = self.wake.wait(work).expect("warm lock");
        }
    }

    fn finish(&self, root: usize, found: Vec<PathBuf>) {
        let mut work = self.work.lock().expect("warm lock");
        work.busy -= 1;
        for rel in found {
            if work.pending.len() >= PENDING_FOLDERS_MAX {
                break;
            }
            work.pending.insert((root, rel));
        }
        self.wake.notify_all();
    }

    /// Reads folder `rel` of root `root` and each entry's inode; returns
    /// the folders in it.
    fn read(&self, root: usize, rel: &std::path::Path) -> Vec<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let base = self.roots[root].as_fd();
        let dir = if rel.as_os_str().is_empty() {
            rustix::fs::openat(base, c".", dir_flags(), Mode::empty())
        } else {
            rustix::fs::openat(base, rel, dir_flags(), Mode::empty())
        };
        let Ok(dir) = dir else {
            return Vec::new();
        };
        let Ok(mut listing) = rustix::fs::Dir::read_from(&dir) else {
            return Vec::new();
        };
        self.folders.fetch_add(1, Relaxed);
        let mut found = Vec::new();
        while let Some(Ok(ent)) = listing.read() {
            if self.stop.load(Relaxed) {
                break;
            }
            let name = ent.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let child = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if self.excludes.is_excluded(&child) {
                continue;
            }
            let mut kind = ent.file_type();
            let st = rustix::fs::statx(
                &dir,
                name,
                AtFlags::SYMLINK_NOFOLLOW,
                StatxFlags::BASIC_STATS,
            );
            self.entries.fetch_add(1, Relaxed);
            if let Ok(st) = st {
                kind = FileType::from_raw_mode(st.stx_mode.into());
            }
            if kind == FileType::Directory {
                found.push(child);
            }
        }
        found
    }
}

/// This thread's count of bytes fetched from the storage layer
/// (`read_bytes` of `/proc/thread-self/io`), read again at each call.
struct IoCounter(Option<std::fs::File>);

impl IoCounter {
    fn open() -> IoCounter {
        IoCounter(
            std::fs::File::open("/proc/thread-self/io")
                .map_err(|e| debug!("warming cannot probe the cache (so it goes on): {e}"))
                .ok(),
        )
    }

    fn read_bytes(&mut self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let f = self.0.as_ref()?;
        let mut buf = [0u8; 512];
        let n = f.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("read_bytes:"))?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Warming reads every folder and every entry of each root once (a root named twice, once through a symlink; no
    /// symlink below it followed), and leave out what is excluded; a
    /// missing root is skipped.
    #[test]
    fn warming_reads_every_folder_and_entry_once() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        for (i, p) in ["a/cur/1", "a/new/2", "b/cur/3", "b/.Sent/cur/4", "skip/x/5"]
            .iter()
            .enumerate()
        {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, i.to_string()).unwrap();
        }
        std::os::unix::fs::symlink("a", root.join("link")).unwrap();
        std::os::unix::fs::symlink(&root, tmp.path().join("via")).unwrap();
        let excludes = Excludes::new(&["skip".to_string()]).unwrap();
        let warming = Warming::start(
            &[
                tmp.path().join("via"),
                root.clone(),
                tmp.path().join("missing"),
            ],
            excludes,
            3,
        );
        let state = warming.state.clone();
        warming.wait();
        // Folders: the root, a, a/cur, a/new, b, b/cur, b/.Sent, b/.Sent/cur
        // (the root named twice).
        assert_eq!(state.folders.load(Relaxed), 8);
        // Entries: 4 files, 7 folders below the root, 1 symlink.
        assert_eq!(state.entries.load(Relaxed), 12);
        assert!(state.work.lock().unwrap().done);
    }

    /// Metadata in the cache (just written): warming stops once its first
    /// [`PROBE_FOLDERS`] folders fetched nothing from the disk. Read from
    /// the disk (the page cache dropped: the suite runs as root): it reads
    /// every folder.
    #[test]
    fn warming_stops_when_the_metadata_is_cached_and_reads_on_when_not() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..300 {
            let d = tmp.path().join(format!("d{i:03}/cur"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("1"), "x").unwrap();
        }
        let run = || {
            let warming =
                Warming::start(&[tmp.path().to_path_buf()], Excludes::new(&[]).unwrap(), 2);
            let state = warming.state.clone();
            warming.wait();
            state
        };
        let cached = run();
        assert!(!cached.fetched.load(Relaxed));
        // (a folder or two more while the other thread was reading)
        assert!(cached.probed.load(Relaxed) >= PROBE_FOLDERS);
        let read = cached.folders.load(Relaxed);
        assert!(
            read < 100,
            "{read} of 601 folders read with the metadata cached"
        );

        rustix::fs::sync();
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .expect("dropping the page cache (the test suite runs as root)");
        let cold = run();
        assert!(cold.fetched.load(Relaxed), "nothing was read from the disk");
        assert_eq!(cold.folders.load(Relaxed), 601, "warming stopped early");
    }

    /// A stop (the node stopping) ends warming: its threads are gone once
    /// it is dropped.
    #[test]
    fn warming_stops_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..200 {
            std::fs::create_dir_all(tmp.path().join(format!("d{i}/cur"))).unwrap();
        }
        let warming = Warming::start(&[tmp.path().to_path_buf()], Excludes::new(&[]).unwrap(), 2);
        let state = Arc::downgrade(&warming.state);
        drop(warming);
        assert!(state.upgrade().is_none(), "a warming thread still runs");
    }
}
