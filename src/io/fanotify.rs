//! Who changed what on a filesystem: fanotify with directory file handles
//! and names (`FAN_REPORT_DFID_NAME`), marked on whole filesystems.
//!
//! Unlike inotify, every fanotify event carries the pid of the process that
//! caused it, which is how a secondary tells its own landings (this
//! process, its io_uring workers included) from writes of anything else
//! into its replica (an MTA left running). Needs `CAP_SYS_ADMIN` (marks)
//! and `CAP_DAC_READ_SEARCH` (`open_by_handle_at`), as root has.
//!
//! The unsafe code here is the two calls libc has no safe form for
//! (`fanotify_init`, `fanotify_mark`) and `open_by_handle_at`; events are
//! parsed from bytes without it.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Events a secondary watches its replica for: anything that adds,
/// removes, renames, rewrites or re-stamps an entry.
pub const CHANGE_MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// One event, as read: the directory it happened in is still a handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    pub pid: i32,
    /// The filesystem's id (a handle is unique only within it).
    pub fsid: [u8; 8],
    /// `struct file_handle`'s type and bytes of the directory.
    pub handle_type: i32,
    pub handle: Vec<u8>,
    /// The entry's name in that directory (empty for events on the
    /// directory itself).
    pub name: OsString,
}

impl RawEvent {
    pub fn is_dir(&self) -> bool {
        self.mask & libc::FAN_ONDIR != 0
    }
}

/// A fanotify group reporting directory handles and names.
pub struct Fanotify {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Events of this pid are counted, not returned (a secondary's own
    /// landings: most of what it reads while it receives).
    skip_pid: Option<i32>,
}

/// What one [`Fanotify::read`] took off the kernel's queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    /// Events read, the skipped ones included.
    pub events: usize,
    /// Events were lost: the kernel's queue overflowed, or a read failed
    /// after others had succeeded (the kernel drops the event it could not
    /// hand over).
    pub overflow: bool,
}

/// Reads per [`Fanotify::read`] while the queue keeps filling the buffer
/// (64 KiB each, about 900 events with names): bounds the events one call
/// returns.
const READS_PER_CALL_MAX: usize = 16;

const META_LEN: usize = 24;
const INFO_HDR_LEN: usize = 4;
const FSID_LEN: usize = 8;

impl Fanotify {
    pub fn new() -> io::Result<Fanotify> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: plain syscall with flag arguments; the result is checked
        // and, when valid, owned by exactly one OwnedFd.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_CLOEXEC) as u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fanotify_init and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Fanotify {
            fd,
            buf: vec![0; 64 * 1024],
            skip_pid: None,
        })
    }

    /// Events caused by `pid` are taken off the queue and counted but not
    /// returned (nor their handles and names copied).
    pub fn skip_pid(&mut self, pid: i32) {
        self.skip_pid = Some(pid);
    }

    /// Reports `mask` for every entry of the filesystem that holds `path`.
    pub fn mark_filesystem(&self, path: &Path, mask: u64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the
        // call; the group fd is open; flags and mask are plain integers.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                mask,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for events, then takes what the queue holds
    /// (up to [`READS_PER_CALL_MAX`] buffers) and appends the events not
    /// skipped to `out`.
    pub fn read(&mut self, timeout: Duration, out: &mut Vec<RawEvent>) -> io::Result<ReadSummary> {
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        let mut sum = ReadSummary::default();
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(sum),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(sum),
            Err(e) => return Err(e.into()),
        }
        for _ in 0..READS_PER_CALL_MAX {
            let n = match rustix::io::read(&self.fd, &mut self.buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) if sum.events > 0 => {
                    // What was read is returned; the event the kernel could
                    // not hand over is gone: reported as lost, like an overflow.
                    tracing::warn!("fanotify read failed after {} events: {e}", sum.events);
                    sum.overflow = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let got = parse(&self.buf[..n], self.skip_pid, out);
            sum.events += got.events;
            sum.overflow |= got.overflow;
            // A read fills the buffer only while more is queued.
            if n < self.buf.len() / 2 {
                break;
            }
        }
        Ok(sum)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a buffer of fanotify events (`struct fanotify_event_metadata`
/// followed by info records) into `out`, counting but not returning the
/// events of `skip_pid`; says how many it read and whether one was a queue
/// overflow. Malformed records end the parse (the kernel does not write them).
pub fn parse(mut b: &[u8], skip_pid: Option<i32>, out: &mut Vec<RawEvent>) -> ReadSummary {
    let mut sum = ReadSummary::default();
    while b.len() >= META_LEN {
        let event_len = u32_at(b, 0) as usize;
        let metadata_len = u16_at(b, 6) as usize;
        if event_len < META_LEN || event_len > b.len() || metadata_len > event_len {
            break;
        }
        let mask = u64_at(b, 8);
        let fd = u32_at(b, 16) as i32;
        let pid = u32_at(b, 20) as i32;
        if fd >= 0 {
            // Not in FID mode this never happens; close it rather than leak.
            // SAFETY: the kernel handed this descriptor to this process
            // with the event, and nothing else refers to it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        sum.events += 1;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            sum.overflow = true;
        }
        if skip_pid == Some(pid) {
            b = &b[event_len..];
            continue;
        }
        let mut info = &b[metadata_len..event_len];
        while info.len() >= INFO_HDR_LEN {
            let kind = info[0];
            let len = u16_at(info, 2) as usize;
            if len < INFO_HDR_LEN || len > info.len() {
                break;
            }
            let rec = &info[..len];
            if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME || kind == libc::FAN_EVENT_INFO_TYPE_DFID
            {
                let h = INFO_HDR_LEN + FSID_LEN;
                if rec.len() >= h + 8 {
                    let bytes = u32_at(rec, h) as usize;
                    let handle_type = u32_at(rec, h + 4) as i32;
                    let start = h + 8;
                    if rec.len() >= start + bytes {
                        let handle = rec[start..start + bytes].to_vec();
                        let rest = &rec[start + bytes..];
                        let name = if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                            let n = &rest[..end];
                            if n == b"." {
                                OsString::new()
                            } else {
                                OsString::from_vec(n.to_vec())
                            }
                        } else {
                            OsString::new()
                        };
                        let mut fsid = [0u8; FSID_LEN];
                        fsid.copy_from_slice(&rec[INFO_HDR_LEN..INFO_HDR_LEN + FSID_LEN]);
                        out.push(RawEvent {
                            mask,
                            pid,
                            fsid,
                            handle_type,
                            handle,
                            name,
                        });
                    }
                }
                break;
            }
            info = &info[len..];
        }
        b = &b[event_len..];
    }
    sum
}

/// The filesystem id of the filesystem holding `fd`, as fanotify reports
/// it in its records.
pub fn fsid_of(fd: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `fd` is an open descriptor for the call's duration and `st`
    // is a writable `struct statfs`; the result is checked before use.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the kernel filled the whole struct.
    let st = unsafe { st.assume_init() };
    // libc keeps `fsid_t`'s field private: its bytes are taken whole, in
    // the kernel's order (the order fanotify writes them in its records).
    // SAFETY: `fsid_t` is `#[repr(C)] struct { int val[2]; }`, 8 bytes without padding; any bytes are a valid `[u8; 8]`.
    let fsid = unsafe { std::mem::transmute::<libc::fsid_t, [u8; 8]>(st.f_fsid) };
    Ok(fsid)
}

/// The path of the directory behind `ev`'s handle, opened through
/// `mount`, whose filesystem id is `mount_fsid`. `None` when it is gone
/// or on another filesystem: a handle is only unique within its
/// filesystem (on ext4 every root directory is inode 2, generation 0), so
/// it is opened only through a descriptor on the filesystem the event
/// names.
pub fn dir_path(mount: BorrowedFd<'_>, mount_fsid: [u8; 8], ev: &RawEvent) -> Option<PathBuf> {
    if ev.fsid != mount_fsid {
        return None;
    }
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    // in a u32 buffer for its alignment.
    let words = 2 + ev.handle.len().div_ceil(4);
    let mut fh = vec![0u32; words];
    fh[0] = ev.handle.len() as u32;
    fh[1] = ev.handle_type as u32;
    {
        let (_, bytes) = fh.split_at_mut(2);
        for (i, b) in ev.handle.iter().enumerate() {
            let w = &mut bytes[i / 4];
            let mut le = w.to_ne_bytes();
            le[i % 4] = *b;
            *w = u32::from_ne_bytes(le);
        }
    }
    // SAFETY: `fh` holds a complete struct file_handle (header and
    // handle_bytes bytes) for the duration of the call; the kernel only
    // reads it. The result is checked and owned by one OwnedFd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor returned by the kernel, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())).ok()?;
    if link.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    Some(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, pid: i32, handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut info = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0];
        info.extend_from_slice(&[7u8; FSID_LEN]);
        info.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        info.extend_from_slice(&1i32.to_ne_bytes());
        info.extend_from_slice(handle);
        info.extend_from_slice(name);
        info.push(0);
        while info.len() % 4 != 0 {
            info.push(0);
        }
        let l = info.len() as u16;
        info[2..4].copy_from_slice(&l.to_ne_bytes());
        let mut b = Vec::new();
        b.extend_from_slice(&((META_LEN + info.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&[3, 0]);
        b.extend_from_slice(&(META_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&(-1i32).to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&info);
        b
    }

    #[test]
    fn parses_events_and_stops_at_truncation() {
        let mut buf = event(libc::FAN_CREATE, 42, &[1, 2, 3, 4, 5, 6, 7, 8], b"msg");
        buf.extend(event(
            libc::FAN_DELETE | libc::FAN_ONDIR,
            43,
            &[9; 12],
            b".",
        ));
        let whole = buf.len();
        buf.extend(event(libc::FAN_CREATE, 44, &[1; 8], b"cut"));
        buf.truncate(whole + 10);
        let mut out = Vec::new();
        assert!(!parse(&buf, None, &mut out).overflow);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].pid, 42);
        assert_eq!(out[0].name, "msg");
        assert_eq!(out[0].handle, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(out[1].is_dir());
        assert_eq!(out[1].name, "");
        assert_eq!(out[1].handle.len(), 12);
        // The events of a skipped pid are counted, not returned.
        let mut kept = Vec::new();
        let sum = parse(&buf, Some(42), &mut kept);
        assert_eq!(sum.events, 2);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].pid, 43);
    }

    /// Two filesystems: the root directory of each has the same inode
    /// number and generation, so a handle from one must never resolve
    /// through the other's descriptor.
    #[test]
    fn a_handle_resolves_only_through_its_own_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut mounted = Vec::new();
        // ext4: every filesystem's root is inode 2, generation 0.
        for m in [&a, &b] {
            std::fs::create_dir(m).unwrap();
            let img = m.with_extension("img");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            let st = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .status()
                .unwrap();
            assert!(st.success(), "mkfs.ext4 (e2fsprogs) is needed");
            let st = std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(m)
                .status()
                .unwrap();
            assert!(st.success(), "mounting a loop device needs root");
            mounted.push(m.clone());
        }
        let result = std::panic::catch_unwind(|| {
            let mut fan = Fanotify::new().unwrap();
            fan.mark_filesystem(&a, CHANGE_MASK).unwrap();
            fan.mark_filesystem(&b, CHANGE_MASK).unwrap();
            let st = std::process::Command::new("touch")
                .arg(b.join("in-b"))
                .status()
                .unwrap();
            assert!(st.success());
            let fa = std::fs::File::open(&a).unwrap();
            let fb = std::fs::File::open(&b).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let mut evs = Vec::new();
                fan.read(Duration::from_millis(100), &mut evs).unwrap();
                if let Some(ev) = evs.iter().find(|e| e.name == "in-b") {
                    let (ida, idb) = (fsid_of(fa.as_fd()).unwrap(), fsid_of(fb.as_fd()).unwrap());
                    assert_ne!(ida, idb);
                    assert_eq!(
                        dir_path(fa.as_fd(), ida, ev),
                        None,
                        "resolved through the wrong filesystem"
                    );
                    assert_eq!(
                        dir_path(fb.as_fd(), idb, ev),
                        Some(std::fs::canonicalize(&b).unwrap())
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no event for the file in b"
                );
            }
        });
        for m in mounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .status();
        }
        result.unwrap();
    }

    #[test]
    fn sees_another_process_create_a_file_and_resolves_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut fan = match Fanotify::new() {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                panic!("fanotify needs CAP_SYS_ADMIN; run the tests as root: {e}")
            }
            Err(e) => panic!("fanotify_init: {e}"),
        };
        fan.mark_filesystem(dir.path(), CHANGE_MASK).unwrap();
        let me = std::process::id() as i32;
        fan.skip_pid(me);
        // This process's own file: read and counted, never returned.
        std::fs::write(dir.path().join("from-me"), b"x").unwrap();
        let target = dir.path().join("from-touch");
        let st = std::process::Command::new("touch")
            .arg(&target)
            .status()
            .unwrap();
        assert!(st.success());
        let mount = std::fs::File::open(dir.path()).unwrap();
        let mount_fsid = fsid_of(mount.as_fd()).unwrap();
        let want = std::fs::canonicalize(dir.path()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = None;
        let (mut read, mut returned) = (0, 0);
        while found.is_none() && std::time::Instant::now() < deadline {
            let mut evs = Vec::new();
            read += fan
                .read(Duration::from_millis(100), &mut evs)
                .unwrap()
                .events;
            returned += evs.len();
            for ev in evs {
                assert_ne!(
                    ev.name, "from-me",
                    "an event of the skipped pid was returned"
                );
                if ev.name == "from-touch" && ev.mask & libc::FAN_CREATE != 0 {
                    found = Some((ev.pid, dir_path(mount.as_fd(), mount_fsid, &ev)));
                }
            }
        }
        let (pid, path) = found.expect("no create event for the file touch made");
        // from-me's create (merged with its close-after-write) came before touch's.
        assert!(read > returned, "{read} events read, {returned} returned");
        assert_ne!(pid, me, "the event names touch, not this process");
        assert_eq!(path, Some(want));
    }
}
