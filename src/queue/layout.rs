//! The queue layout model: how queued messages are found, validated,
//! identified and placed, for three layouts.
//!
//! - [`Layout::Flat`]: one regular file per message directly in the queue
//!   directory, named by its ID.
//! - [`Layout::Postfix`]: the Postfix queue directory. Messages live in the
//!   sub-queues `incoming`, `active`, `deferred`, `hold` and `maildrop`,
//!   directly or in single-character hash directories (up to two levels).
//!   A file in `incoming/` without the owner-execute bit is still being
//!   written by `cleanup` and is reported as incomplete.
//! - [`Layout::Exim`]: the Exim spool directory. A message is the pair
//!   `input/<id>-H` + `input/<id>-D` (optionally under `input/<c>/` with
//!   `split_spool_directory`); the first line of each file names the message.
//!
//! [`scan`] never deletes, moves or follows anything: what it cannot use it
//! reports as [`Garbage`] (with a reason) or as incomplete, and leaves in
//! place. Metadata is reported exactly, because it is meaning in a spool:
//! Postfix reads u+x as "complete", g+x as "force-expired", and a deferred
//! file's mtime as its next retry time.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, FileType, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use xxhash_rust::xxh3::Xxh3Default;

use crate::wire::sync::Meta;

/// The kind of queue directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Flat,
    #[default]
    Postfix,
    Exim,
}

/// One file of a queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// `""` for flat and Postfix; `"-H"` / `"-D"` for Exim.
    pub suffix: String,
    /// Absolute path of the file.
    pub path: PathBuf,
    pub size: u64,
    pub meta: Meta,
}

/// A message found in a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub queue_id: String,
    /// Postfix: `incoming`, `active`, `deferred`, `hold` or `maildrop`;
    /// flat and Exim: `""`.
    pub sub_queue: String,
    /// Exim: exactly `[-H, -D]`, in that order; otherwise one part.
    pub parts: Vec<Part>,
    /// Files the MTA keeps per message under its queue ID, elsewhere in
    /// the queue: Postfix's `defer/`, `bounce/` and `trace/` logs (the
    /// reasons in delay and bounce notices), Exim's `msglog/`. They travel
    /// with the message (renamed with it) but are not part of its identity:
    /// they grow with every delivery attempt. `suffix` is the kind.
    pub side: Vec<Part>,
}

/// Kinds of per-message side files of `layout` ([`QueuedMessage::side`]).
pub fn side_kinds(layout: Layout) -> &'static [&'static str] {
    match layout {
        Layout::Flat => &[],
        Layout::Postfix => &POSTFIX_LOG_DIRS,
        Layout::Exim => &[EXIM_MSGLOG],
    }
}

/// Where the side file `kind` of a message with this ID lands.
pub fn side_target(layout: Layout, queue_dir: &Path, kind: &str, queue_id: &str) -> PathBuf {
    let root = std::path::absolute(queue_dir).unwrap_or_else(|_| queue_dir.to_owned());
    match layout {
        Layout::Postfix => {
            let base = root.join(kind);
            let depth = postfix_depth(&base, kind);
            postfix_hashed(base, queue_id, depth).join(queue_id)
        }
        Layout::Exim => {
            let dir = root.join(EXIM_MSGLOG);
            match exim_split_char(queue_id) {
                Some(c) if !single_char_subdirs(&dir).is_empty() => dir.join(c.to_string()),
                _ => dir,
            }
            .join(queue_id)
        }
        Layout::Flat => root.join(kind).join(queue_id),
    }
}

/// Something in a queue that is not a usable message; left in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub path: PathBuf,
    pub reason: String,
}

/// Everything [`scan`] found.
#[derive(Debug, Clone, Default)]
pub struct QueueScan {
    /// Sorted by `(sub_queue, queue_id)`.
    pub messages: Vec<QueuedMessage>,
    /// Sorted by path.
    pub garbage: Vec<Garbage>,
    /// Messages the MTA has not finished with (a Postfix file still being
    /// written, an Exim message with a delivery journal): not pushable yet,
    /// not garbage. Sorted by path.
    pub incomplete: Vec<PathBuf>,
}

/// A queue that cannot be scanned as a whole.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue directory {path} does not exist: {source}")]
    Missing { path: PathBuf, source: io::Error },
    #[error("queue directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Unreadable { path: PathBuf, source: io::Error },
}

impl QueueError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            QueueError::Missing { path, .. }
            | QueueError::NotADirectory { path }
            | QueueError::Unreadable { path, .. } => path,
        }
    }

    /// The OS error number, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            QueueError::Missing { source, .. } | QueueError::Unreadable { source, .. } => {
                source.raw_os_error()
            }
            QueueError::NotADirectory { .. } => Some(Errno::NOTDIR.raw_os_error()),
        }
    }
}

/// Postfix sub-queues that hold messages.
pub const POSTFIX_SUB_QUEUES: [&str; 5] = ["incoming", "active", "deferred", "hold", "maildrop"];
/// Postfix directories hashed by default (`hash_queue_names`).
const POSTFIX_HASHED: [&str; 2] = ["deferred", "defer"];
/// Postfix directories whose entries are named by queue ID: the message
/// sub-queues plus the per-message logs and the quarantine-ish dirs. An ID is
/// taken if it exists in any of them (a stale `defer/` log would be merged
/// into the new message's delay notices).
const POSTFIX_ID_DIRS: [&str; 10] = [
    "incoming", "active", "deferred", "hold", "maildrop", "defer", "bounce", "trace", "corrupt",
    "saved",
];
/// Postfix's per-message logs, named by queue ID.
const POSTFIX_LOG_DIRS: [&str; 3] = ["defer", "bounce", "trace"];
/// Deepest Postfix hash (`hash_queue_depth`) that [`scan`] descends into.
const POSTFIX_HASH_DEPTH_MAX: usize = 2;
/// Postfix's long-queue-ID alphabet (base 52, no vowels), in digit order.
const POSTFIX_B52: &[u8; 52] = b"0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz";
/// The same without `z` (base 51, for the inode part).
const POSTFIX_B51: &[u8; 51] = b"0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxy";
/// Length of the time part (seconds + microseconds) of a long Postfix ID.
const POSTFIX_LONG_TIME_LEN: usize = 10;
/// Exim's base-62 alphabet, in digit order.
const EXIM_B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Exim's spool directory holding messages.
const EXIM_INPUT: &str = "input";
/// Exim's per-message log directory.
const EXIM_MSGLOG: &str = "msglog";
/// Exim spool file suffixes that belong to a message.
const EXIM_SUFFIXES: [&str; 3] = ["-H", "-D", "-J"];
/// Bytes of a first line worth quoting in a reason.
const QUOTE_MAX: usize = 64;

const R_NOT_ID: &str = "name is not a queue ID";
const R_SYMLINK: &str = "symlink (never followed)";

/// Finds every message. Never deletes, moves or follows anything. Skips the
/// internal dir `.hasync` at the queue root (for flat queues: every dotfile).
///
/// The queue directory itself may be reached through a symlink (it is the
/// operator's configuration); inside it, a symlink is garbage.
pub fn scan(layout: Layout, queue_dir: &Path) -> Result<QueueScan, QueueError> {
    let root = std::path::absolute(queue_dir).map_err(|source| QueueError::Missing {
        path: queue_dir.to_owned(),
        source,
    })?;
    match std::fs::metadata(&root) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(QueueError::NotADirectory { path: root }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(QueueError::Missing {
                path: root,
                source: e,
            })
        }
        Err(source) => return Err(QueueError::Unreadable { path: root, source }),
    }
    let mut s = Scanner::default();
    match layout {
        Layout::Flat => s.flat(&root)?,
        Layout::Postfix => s.postfix(&root)?,
        Layout::Exim => s.exim(&root)?,
    }
    Ok(s.finish(layout, &root))
}

/// Dedup key of a message: xxh3-128 over the queue ID, a 0 byte, then for
/// each part in order its suffix, its length (u64 little-endian) and its
/// content. Reads the files (never through a symlink); fails if a file
/// changes size while being read.
pub fn identity(msg: &QueuedMessage) -> io::Result<u128> {
    let mut h = Xxh3Default::new();
    start_identity(&mut h, &msg.queue_id);
    let mut buf = vec![0u8; 64 * 1024];
    for part in &msg.parts {
        let file = match open_nofollow(&part.path) {
            Ok(f) => f,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", part.path.display()),
                ))
            }
        };
        let md = file.metadata()?;
        if !md.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file", part.path.display()),
            ));
        }
        let size = md.len();
        h.update(part.suffix.as_bytes());
        h.update(&size.to_le_bytes());
        let mut read = 0u64;
        let mut f = &file;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", part.path.display()),
                    ))
                }
            };
            read += n as u64;
            if read > size {
                break;
            }
            h.update(&buf[..n]);
        }
        if read != size {
            return Err(io::Error::other(format!(
                "{}: changed while being hashed ({size} bytes at open, {read} read)",
                part.path.display()
            )));
        }
    }
    Ok(h.digest128())
}

/// Same key as [`identity`] from already-read bytes: `parts = [(suffix, bytes)]`.
pub fn identity_of(queue_id: &str, parts: &[(&str, &[u8])]) -> u128 {
    let mut h = Xxh3Default::new();
    start_identity(&mut h, queue_id);
    for (suffix, bytes) in parts {
        h.update(suffix.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.digest128()
}

fn start_identity(h: &mut Xxh3Default, queue_id: &str) {
    h.update(queue_id.as_bytes());
    h.update(&[0]);
}

/// Whether `id` is a queue ID of `layout`:
/// - flat: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`;
/// - Postfix: `[0-9A-Za-z]{6,32}` (short and long queue IDs);
/// - Exim: `[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}`.
pub fn valid_queue_id(layout: Layout, id: &str) -> bool {
    let b = id.as_bytes();
    match layout {
        Layout::Flat => {
            (1..=64).contains(&b.len())
                && b[0].is_ascii_alphanumeric()
                && b[1..]
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        }
        Layout::Postfix => (6..=32).contains(&b.len()) && b.iter().all(u8::is_ascii_alphanumeric),
        Layout::Exim => {
            let mut seg = id.split('-');
            let ok = |s: Option<&str>, lens: std::ops::RangeInclusive<usize>| {
                s.is_some_and(|s| {
                    lens.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric())
                })
            };
            ok(seg.next(), 6..=6)
                && ok(seg.next(), 6..=11)
                && ok(seg.next(), 2..=4)
                && seg.next().is_none()
        }
    }
}

/// Whether `sub` names a sub-queue of `layout` (flat and Exim: only `""`).
pub fn valid_sub_queue(layout: Layout, sub: &str) -> bool {
    match layout {
        Layout::Flat | Layout::Exim => sub.is_empty(),
        Layout::Postfix => POSTFIX_SUB_QUEUES.contains(&sub),
    }
}

/// The part suffixes of a message, in order: flat/Postfix `[""]`, Exim `["-H", "-D"]`.
pub fn valid_suffixes(layout: Layout) -> &'static [&'static str] {
    match layout {
        Layout::Flat | Layout::Postfix => &[""],
        Layout::Exim => &["-H", "-D"],
    }
}

/// Directory (absolute) where a message with this ID lands in `sub_queue`.
///
/// - Flat: the queue root.
/// - Postfix: `<root>/<sub_queue>`, hashed when the sub-queue is `deferred`
///   or `defer` (Postfix's default `hash_queue_names`) or when it already
///   contains single-character subdirectories; the depth (1 or 2) follows
///   what exists (default 1). The hash characters are Postfix's own: the
///   first characters of a short ID, and for a long ID the microseconds
///   field converted to 5 hex digits (`mail_queue_dir`), so that Postfix
///   finds the file where it looks for it.
/// - Exim: `<root>/input/`, or `<root>/input/<6th char of the ID>/` when
///   `input/` contains single-character subdirectories (`split_spool_directory`).
pub fn target_dir(layout: Layout, queue_dir: &Path, sub_queue: &str, queue_id: &str) -> PathBuf {
    let root = std::path::absolute(queue_dir).unwrap_or_else(|_| queue_dir.to_owned());
    target_in(
        layout,
        &root,
        sub_queue,
        queue_id,
        |base| postfix_depth(base, sub_queue),
        exim_split,
    )
}

/// [`target_dir`] with the directory geometry supplied by the caller (probed
/// each time, or read once by [`QueueView`]).
fn target_in(
    layout: Layout,
    root: &Path,
    sub_queue: &str,
    queue_id: &str,
    depth_of: impl FnOnce(&Path) -> usize,
    split_of: impl FnOnce(&Path) -> bool,
) -> PathBuf {
    match layout {
        Layout::Flat => root.to_owned(),
        Layout::Postfix => {
            let base = root.join(sub_queue);
            let depth = depth_of(&base);
            postfix_hashed(base, queue_id, depth)
        }
        Layout::Exim => {
            let input = root.join(EXIM_INPUT);
            match exim_split_char(queue_id) {
                Some(c) if split_of(&input) => input.join(c.to_string()),
                _ => input,
            }
        }
    }
}

/// Hash depth a Postfix sub-queue uses (at least 1 for a hashed one).
fn postfix_depth(base: &Path, sub_queue: &str) -> usize {
    match hash_depth(base) {
        0 if POSTFIX_HASHED.contains(&sub_queue) => 1,
        d => d,
    }
}

/// Whether Exim's `input/` is split (`split_spool_directory`).
fn exim_split(input: &Path) -> bool {
    !single_char_subdirs(input).is_empty()
}

/// Nothing (not even a dangling symlink) at `p`; an error other than
/// "not found" counts as taken.
fn nothing_at(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// A new valid ID for `layout`, derived from `seed` (for a pushed ID that is
/// invalid or taken on the receiver). Deterministic; distinct seeds give
/// distinct IDs (the seed is mixed bijectively and encoded whole).
///
/// - Flat: `hasync-<16 hex digits>`.
/// - Postfix: a long queue ID (6 chars seconds + 4 chars microseconds in
///   base 52, `z`, base-51 "inode"), accepted whatever `enable_long_queue_ids` says.
/// - Exim: a 16-character ID in the classic `tttttt-pppppp-ff` base-62 form,
///   which every Exim version reads.
pub fn fresh_queue_id(layout: Layout, seed: u64) -> String {
    let h = mix64(seed);
    match layout {
        Layout::Flat => format!("hasync-{h:016x}"),
        Layout::Postfix => {
            let mut id = String::with_capacity(23);
            encode_fixed(&mut id, (h >> 16) % 52u64.pow(6), POSTFIX_B52, 6);
            encode_fixed(&mut id, (h >> 8) % 1_000_000, POSTFIX_B52, 4);
            id.push('z');
            encode_min(&mut id, h, POSTFIX_B51);
            id
        }
        Layout::Exim => {
            let p6 = 62u64.pow(6);
            let mut id = String::with_capacity(16);
            encode_fixed(&mut id, h / p6, EXIM_B62, 6);
            id.push('-');
            encode_fixed(&mut id, h % p6, EXIM_B62, 6);
            id.push('-');
            encode_fixed(&mut id, (h >> 40) % (62 * 62), EXIM_B62, 2);
            id
        }
    }
}

/// True if no file for this ID exists where a message with this ID would
/// collide, i.e. in [`target_dir`] (all suffixes), and also:
/// - Postfix: in any sub-queue or per-message log directory (`defer`,
///   `bounce`, `trace`, …), hashed or not: queue IDs are unique across the
///   whole queue, and Postfix merges a stale log into a new message's notices;
/// - Exim: in `input/` and `input/<c>/` (`-H`, `-D`, `-J`) and `msglog/`.
///
/// An invalid ID is never free.
pub fn id_free(layout: Layout, queue_dir: &Path, sub_queue: &str, queue_id: &str) -> bool {
    if !valid_queue_id(layout, queue_id) {
        return false;
    }
    let root = std::path::absolute(queue_dir).unwrap_or_else(|_| queue_dir.to_owned());
    let mut candidates: Vec<PathBuf> = Vec::new();
    let target = target_dir(layout, &root, sub_queue, queue_id);
    for s in valid_suffixes(layout) {
        candidates.push(target.join(format!("{queue_id}{s}")));
    }
    match layout {
        Layout::Flat => {}
        Layout::Postfix => {
            for dir in POSTFIX_ID_DIRS {
                for depth in 0..=POSTFIX_HASH_DEPTH_MAX {
                    candidates.push(postfix_hashed(root.join(dir), queue_id, depth).join(queue_id));
                }
            }
        }
        Layout::Exim => {
            for top in [EXIM_INPUT, EXIM_MSGLOG] {
                let mut dirs = vec![root.join(top)];
                if let Some(c) = exim_split_char(queue_id) {
                    dirs.push(root.join(top).join(c.to_string()));
                }
                for d in dirs {
                    if top == EXIM_INPUT {
                        candidates.extend(
                            EXIM_SUFFIXES
                                .iter()
                                .map(|s| d.join(format!("{queue_id}{s}"))),
                        );
                    } else {
                        candidates.push(d.join(queue_id));
                    }
                }
            }
        }
    }
    // Anything there (even a dangling symlink) or unknowable means taken.
    candidates.iter().all(|p| nothing_at(p))
}

/// What an ingest needs to know about the receiving queue, read once per
/// push instead of probed per message: every queue ID in use (what
/// [`id_free`] stats its candidate paths for) and each sub-queue's hash
/// depth (what [`target_dir`] probes up to 62 × 17 names for). IDs this
/// process lands are added as it goes; the exact target paths are still
/// checked per message, so a file the MTA created after the walk is never
/// replaced.
#[derive(Debug)]
pub struct QueueView {
    layout: Layout,
    root: PathBuf,
    ids: std::collections::HashSet<String>,
    depths: std::collections::HashMap<String, usize>,
    exim_split: Option<bool>,
}

impl QueueView {
    /// Walks the ID directories of `queue_dir` once.
    pub fn load(layout: Layout, queue_dir: &Path) -> io::Result<QueueView> {
        let root = std::path::absolute(queue_dir).unwrap_or_else(|_| queue_dir.to_owned());
        let mut ids = std::collections::HashSet::new();
        match layout {
            Layout::Flat => collect_names(&root, 0, &mut ids, &[])?,
            Layout::Postfix => {
                for dir in POSTFIX_ID_DIRS {
                    collect_names(&root.join(dir), POSTFIX_HASH_DEPTH_MAX, &mut ids, &[])?;
                }
            }
            Layout::Exim => {
                collect_names(&root.join(EXIM_INPUT), 1, &mut ids, &EXIM_SUFFIXES)?;
                collect_names(&root.join(EXIM_MSGLOG), 1, &mut ids, &[])?;
            }
        }
        Ok(QueueView {
            layout,
            root,
            ids,
            depths: Default::default(),
            exim_split: None,
        })
    }

    /// Like [`target_dir`], with the directory geometry read once.
    pub fn target_dir(&mut self, sub_queue: &str, queue_id: &str) -> PathBuf {
        let (depths, split) = (&mut self.depths, &mut self.exim_split);
        target_in(
            self.layout,
            &self.root,
            sub_queue,
            queue_id,
            |base| {
                *depths
                    .entry(sub_queue.to_string())
                    .or_insert_with(|| postfix_depth(base, sub_queue))
            },
            |input| *split.get_or_insert_with(|| exim_split(input)),
        )
    }

    /// Whether `queue_id` may be given to a message landing in `sub_queue`:
    /// valid, not in use anywhere in the queue when it was walked or since
    /// landed by us, and nothing at its target paths now.
    pub fn is_free(&mut self, sub_queue: &str, queue_id: &str) -> bool {
        if !valid_queue_id(self.layout, queue_id) || self.ids.contains(queue_id) {
            return false;
        }
        let dir = self.target_dir(sub_queue, queue_id);
        valid_suffixes(self.layout)
            .iter()
            .all(|s| nothing_at(&dir.join(format!("{queue_id}{s}"))))
    }

    /// Records an ID as taken (a message this process is landing).
    pub fn insert(&mut self, queue_id: &str) {
        self.ids.insert(queue_id.to_string());
    }
}

/// Adds the name of every entry under `dir` (descending into single-character
/// hash directories up to `depth` levels) to `ids`, minus any of `suffixes`.
/// A missing directory has no names.
fn collect_names(
    dir: &Path,
    depth: usize,
    ids: &mut std::collections::HashSet<String>,
    suffixes: &[&str],
) -> io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && depth > 0 && name.len() == 1 {
            collect_names(&e.path(), depth - 1, ids, suffixes)?;
            continue;
        }
        let id = suffixes
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        ids.insert(id.to_string());
    }
    Ok(())
}

/// Exim's `-H` file starts with the line `<id>-H`. Returns the `-H` bytes with
/// that line naming `new_id` instead, or `None` if `h` does not start with a
/// valid `<id>-H` line or `new_id` is not a valid Exim ID.
pub fn rewrite_exim_header(h: &[u8], new_id: &str) -> Option<Vec<u8>> {
    rewrite_exim_first_line(h, new_id, "-H")
}

/// Exim's `-D` file starts with the line `<id>-D`, and Exim finds the body at
/// an offset computed from the ID's length: when a message gets a new ID, the
/// `-D` bytes must be rewritten too. Returns them, or `None` as for
/// [`rewrite_exim_header`].
pub fn rewrite_exim_data(d: &[u8], new_id: &str) -> Option<Vec<u8>> {
    rewrite_exim_first_line(d, new_id, "-D")
}

fn rewrite_exim_first_line(bytes: &[u8], new_id: &str, suffix: &str) -> Option<Vec<u8>> {
    if !valid_queue_id(Layout::Exim, new_id) {
        return None;
    }
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let old = std::str::from_utf8(&bytes[..nl])
        .ok()?
        .strip_suffix(suffix)?;
    if !valid_queue_id(Layout::Exim, old) {
        return None;
    }
    let rest = &bytes[nl + 1..];
    let mut out = Vec::with_capacity(new_id.len() + suffix.len() + 1 + rest.len());
    out.extend_from_slice(new_id.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(rest);
    Some(out)
}

// ---------------------------------------------------------------------------
// Scanning

/// One directory entry, type not followed.
struct Ent {
    raw: OsString,
    /// `None` when the name is not UTF-8 (never a queue ID).
    name: Option<String>,
    path: PathBuf,
    ft: FileType,
}

impl Ent {
    fn is_dotfile(&self) -> bool {
        self.raw.as_encoded_bytes().first() == Some(&b'.')
    }
}

/// Lists a directory, sorted by name; `None` if it vanished.
fn list_dir(dir: &Path) -> Result<Option<Vec<Ent>>, QueueError> {
    let unreadable = |source| QueueError::Unreadable {
        path: dir.to_owned(),
        source,
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(unreadable)?;
        let ft = match e.file_type() {
            Ok(ft) => ft,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(QueueError::Unreadable {
                    path: e.path(),
                    source: err,
                })
            }
        };
        let raw = e.file_name();
        out.push(Ent {
            name: raw.to_str().map(str::to_owned),
            raw,
            path: e.path(),
            ft,
        });
    }
    out.sort_by(|a, b| a.raw.cmp(&b.raw));
    Ok(Some(out))
}

/// A regular file opened without following symlinks.
struct Opened {
    file: File,
    size: u64,
    meta: Meta,
}

enum Open {
    File(Opened),
    /// Vanished between listing and opening (the MTA moved it).
    Gone,
    Bad(String),
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::open(path, flags, Mode::empty())?))
}

fn open_regular(path: &Path) -> Open {
    let file = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Open::Gone,
        Err(e) if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
            return Open::Bad(R_SYMLINK.into())
        }
        Err(e) => return Open::Bad(format!("unreadable: {e}")),
    };
    let md = match file.metadata() {
        Ok(md) => md,
        Err(e) => return Open::Bad(format!("cannot stat: {e}")),
    };
    if !md.is_file() {
        return Open::Bad(kind_reason(md.file_type()));
    }
    Open::File(Opened {
        size: md.len(),
        meta: meta_of(&md),
        file,
    })
}

fn meta_of(md: &Metadata) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: md.mtime(),
        mtime_nsec: u32::try_from(md.mtime_nsec()).unwrap_or(0),
    }
}

fn kind_reason(ft: FileType) -> String {
    if ft.is_symlink() {
        return R_SYMLINK.into();
    }
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "of an unknown type"
    };
    format!("not a regular file: {what}")
}

/// A single ASCII alphanumeric character: the name of a hash directory.
fn is_hash_dir_name(name: Option<&str>) -> bool {
    name.is_some_and(|n| n.len() == 1 && n.as_bytes()[0].is_ascii_alphanumeric())
}

/// Postfix's temporary name while `mail_queue_enter` creates a file
/// (`<usec>.<pid>`), before it is renamed to its queue ID.
fn is_postfix_temp_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// One Exim spool file of a message, seen in one directory.
struct EximFile {
    path: PathBuf,
}

#[derive(Default)]
struct EximGroup {
    h: Option<EximFile>,
    d: Option<EximFile>,
    j: Option<EximFile>,
}

#[derive(Default)]
struct Scanner {
    messages: Vec<QueuedMessage>,
    garbage: Vec<Garbage>,
    incomplete: Vec<PathBuf>,
}

impl Scanner {
    fn garbage(&mut self, path: &Path, reason: impl Into<String>) {
        self.garbage.push(Garbage {
            path: path.to_owned(),
            reason: reason.into(),
        });
    }

    fn part(suffix: &str, path: &Path, o: &Opened) -> Part {
        Part {
            suffix: suffix.into(),
            path: path.to_owned(),
            size: o.size,
            meta: o.meta,
        }
    }

    fn flat(&mut self, root: &Path) -> Result<(), QueueError> {
        let Some(ents) = list_dir(root)? else {
            return Err(QueueError::Missing {
                path: root.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        };
        for e in ents {
            // Dotfiles (including `.hasync`) are never messages; directories
            // are not part of a flat queue and are left alone.
            if e.is_dotfile() || e.ft.is_dir() {
                continue;
            }
            if !e.ft.is_file() {
                self.garbage(&e.path, kind_reason(e.ft));
                continue;
            }
            let Some(name) = e
                .name
                .as_deref()
                .filter(|n| valid_queue_id(Layout::Flat, n))
            else {
                self.garbage(&e.path, R_NOT_ID);
                continue;
            };
            match open_regular(&e.path) {
                Open::File(o) => self.messages.push(QueuedMessage {
                    queue_id: name.to_owned(),
                    sub_queue: String::new(),
                    parts: vec![Self::part("", &e.path, &o)],
                    side: Vec::new(),
                }),
                Open::Gone => {}
                Open::Bad(reason) => self.garbage(&e.path, reason),
            }
        }
        Ok(())
    }

    /// Checks that `dir` (a sub-queue or Exim's `input`) is a real
    /// directory; `false` if it is missing or was reported as garbage.
    fn top_dir(&mut self, dir: &Path, what: &str) -> Result<bool, QueueError> {
        match std::fs::symlink_metadata(dir) {
            Ok(md) if md.is_dir() => Ok(true),
            Ok(md) if md.file_type().is_symlink() => {
                self.garbage(dir, R_SYMLINK);
                Ok(false)
            }
            Ok(_) => {
                self.garbage(dir, format!("{what} is not a directory"));
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(QueueError::Unreadable {
                path: dir.to_owned(),
                source,
            }),
        }
    }

    fn postfix(&mut self, root: &Path) -> Result<(), QueueError> {
        for sub in POSTFIX_SUB_QUEUES {
            let dir = root.join(sub);
            if self.top_dir(&dir, "a Postfix sub-queue")? {
                self.postfix_dir(sub, &dir, 0)?;
            }
        }
        Ok(())
    }

    fn postfix_dir(&mut self, sub: &str, dir: &Path, depth: usize) -> Result<(), QueueError> {
        let Some(ents) = list_dir(dir)? else {
            return Ok(());
        };
        let mut subdirs = Vec::new();
        for e in ents {
            if e.ft.is_dir() {
                if !is_hash_dir_name(e.name.as_deref()) {
                    self.garbage(&e.path, "unexpected directory in a Postfix sub-queue");
                } else if depth >= POSTFIX_HASH_DEPTH_MAX {
                    self.garbage(&e.path, "hash directory nested deeper than 2 levels");
                } else {
                    subdirs.push(e.path);
                }
                continue;
            }
            if !e.ft.is_file() {
                self.garbage(&e.path, kind_reason(e.ft));
                continue;
            }
            let name = e.name.as_deref().unwrap_or_default();
            if matches!(sub, "incoming" | "maildrop") && is_postfix_temp_name(name) {
                // Being created: renamed to its queue ID when complete.
                self.incomplete.push(e.path);
                continue;
            }
            if !valid_queue_id(Layout::Postfix, name) {
                self.garbage(&e.path, R_NOT_ID);
                continue;
            }
            match open_regular(&e.path) {
                Open::File(o) if sub == "incoming" && o.meta.mode & 0o100 == 0 => {
                    // No owner-execute bit: cleanup is still writing it.
                    self.incomplete.push(e.path);
                }
                Open::File(o) => self.messages.push(QueuedMessage {
                    queue_id: name.to_owned(),
                    sub_queue: sub.to_owned(),
                    parts: vec![Self::part("", &e.path, &o)],
                    side: Vec::new(),
                }),
                Open::Gone => {}
                Open::Bad(reason) => self.garbage(&e.path, reason),
            }
        }
        for d in subdirs {
            self.postfix_dir(sub, &d, depth + 1)?;
        }
        Ok(())
    }

    fn exim(&mut self, root: &Path) -> Result<(), QueueError> {
        let input = root.join(EXIM_INPUT);
        if self.top_dir(&input, "Exim's input")? {
            self.exim_dir(&input, 0)?;
        }
        Ok(())
    }

    fn exim_dir(&mut self, dir: &Path, depth: usize) -> Result<(), QueueError> {
        let Some(ents) = list_dir(dir)? else {
            return Ok(());
        };
        let mut groups: BTreeMap<String, EximGroup> = BTreeMap::new();
        let mut subdirs = Vec::new();
        for e in ents {
            if e.ft.is_dir() {
                if depth == 0 && is_hash_dir_name(e.name.as_deref()) {
                    subdirs.push(e.path);
                } else {
                    self.garbage(&e.path, "unexpected directory in Exim's input");
                }
                continue;
            }
            if !e.ft.is_file() {
                self.garbage(&e.path, kind_reason(e.ft));
                continue;
            }
            let parsed = e.name.as_deref().and_then(|n| {
                let (id, suffix) = n.split_at(n.len().checked_sub(2)?);
                (valid_queue_id(Layout::Exim, id) && EXIM_SUFFIXES.contains(&suffix))
                    .then_some((id, suffix))
            });
            let Some((id, suffix)) = parsed else {
                self.garbage(&e.path, "name is not an Exim spool file name");
                continue;
            };
            let g = groups.entry(id.to_owned()).or_default();
            let slot = match suffix {
                "-H" => &mut g.h,
                "-D" => &mut g.d,
                _ => &mut g.j,
            };
            *slot = Some(EximFile { path: e.path });
        }
        for (id, g) in groups {
            self.exim_message(&id, g);
        }
        for d in subdirs {
            self.exim_dir(&d, depth + 1)?;
        }
        Ok(())
    }

    fn exim_message(&mut self, id: &str, g: EximGroup) {
        let (h, d) = match (g.h, g.d) {
            (Some(h), Some(d)) => (h, d),
            (h, d) => {
                if let Some(h) = h {
                    self.garbage(&h.path, "truncated Exim message: -D missing");
                }
                if let Some(d) = d {
                    self.garbage(&d.path, "truncated Exim message: -H missing");
                }
                if let Some(j) = g.j {
                    self.garbage(&j.path, "Exim delivery journal of a truncated message");
                }
                return;
            }
        };
        if let Some(j) = g.j {
            // A delivery was interrupted: the journal lists recipients already
            // delivered, which Exim folds into -H on its next run. Pushing the
            // pair without it would deliver to them twice.
            self.incomplete.push(j.path);
            return;
        }
        let (ho, doo) = match (open_regular(&h.path), open_regular(&d.path)) {
            (Open::File(ho), Open::File(doo)) => (ho, doo),
            // Exim removed the message while we looked: delivered.
            (Open::Gone, _) | (_, Open::Gone) => return,
            (ho, doo) => {
                for (o, f, other) in [(ho, &h, "-D"), (doo, &d, "-H")] {
                    match o {
                        Open::Bad(reason) => self.garbage(&f.path, reason),
                        _ => {
                            self.garbage(&f.path, format!("the message's {other} file is unusable"))
                        }
                    }
                }
                return;
            }
        };
        let checks = [
            (
                &ho,
                &h,
                "-H",
                "header names another message",
                "its -H names another message",
            ),
            (
                &doo,
                &d,
                "-D",
                "data file names another message",
                "its -D names another message",
            ),
        ];
        for (o, f, suffix, reason, other_reason) in checks {
            if let Err(bad) = first_line_is(&o.file, id, suffix) {
                let other = if suffix == "-H" { &d } else { &h };
                match bad {
                    FirstLine::Other(line) => self.garbage(&f.path, format!("{reason} ({line})")),
                    FirstLine::Unreadable(e) => self.garbage(&f.path, format!("unreadable: {e}")),
                }
                self.garbage(&other.path, other_reason);
                return;
            }
        }
        self.messages.push(QueuedMessage {
            queue_id: id.to_owned(),
            sub_queue: String::new(),
            parts: vec![
                Self::part("-H", &h.path, &ho),
                Self::part("-D", &d.path, &doo),
            ],
            side: Vec::new(),
        });
    }

    /// Orders the findings, and turns second copies of one ID in one
    /// sub-queue into garbage (keeping the copy where the MTA looks).
    fn finish(mut self, layout: Layout, root: &Path) -> QueueScan {
        self.messages.sort_by(|a, b| {
            (&a.sub_queue, &a.queue_id, &a.parts[0].path).cmp(&(
                &b.sub_queue,
                &b.queue_id,
                &b.parts[0].path,
            ))
        });
        let mut messages: Vec<QueuedMessage> = Vec::with_capacity(self.messages.len());
        let mut i = 0;
        while i < self.messages.len() {
            let mut j = i + 1;
            while j < self.messages.len()
                && self.messages[j].sub_queue == self.messages[i].sub_queue
                && self.messages[j].queue_id == self.messages[i].queue_id
            {
                j += 1;
            }
            let group = &self.messages[i..j];
            let keep = if group.len() == 1 {
                0
            } else {
                let m = &group[0];
                let target = target_dir(layout, root, &m.sub_queue, &m.queue_id);
                group
                    .iter()
                    .position(|m| m.parts[0].path.parent() == Some(target.as_path()))
                    .unwrap_or(0)
            };
            for (k, m) in group.iter().enumerate() {
                if k != keep {
                    let also = group[keep].parts[0].path.display().to_string();
                    for p in &m.parts {
                        self.garbage.push(Garbage {
                            path: p.path.clone(),
                            reason: format!(
                                "duplicate queue ID (the copy Postfix/Exim uses is {also})"
                            ),
                        });
                    }
                }
            }
            messages.push(group[keep].clone());
            i = j;
        }
        attach_side_files(layout, root, &mut messages);
        self.garbage.sort_by(|a, b| a.path.cmp(&b.path));
        self.incomplete.sort();
        QueueScan {
            messages,
            garbage: self.garbage,
            incomplete: self.incomplete,
        }
    }
}

/// Finds each message's side files (regular files named by its ID in the
/// layout's log directories, hashed or not) and attaches them. Side files
/// of no message are left alone.
fn attach_side_files(layout: Layout, root: &Path, messages: &mut [QueuedMessage]) {
    for kind in side_kinds(layout) {
        let mut found: std::collections::HashMap<String, (PathBuf, Opened)> = Default::default();
        let mut stack = vec![(root.join(kind), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(Some(ents)) = list_dir(&dir) else {
                continue;
            };
            for e in ents {
                if e.ft.is_dir() {
                    if depth < POSTFIX_HASH_DEPTH_MAX && is_hash_dir_name(e.name.as_deref()) {
                        stack.push((e.path, depth + 1));
                    }
                    continue;
                }
                let (true, Some(name)) = (e.ft.is_file(), e.name) else {
                    continue;
                };
                if let Open::File(o) = open_regular(&e.path) {
                    found.insert(name, (e.path, o));
                }
            }
        }
        if found.is_empty() {
            continue;
        }
        for m in messages.iter_mut() {
            if let Some((path, o)) = found.remove(&m.queue_id) {
                m.side.push(Scanner::part(kind, &path, &o));
            }
        }
    }
}

/// Why a spool file's first line is not the expected one.
enum FirstLine {
    /// The first line it has instead (quoted, shortened).
    Other(String),
    Unreadable(io::Error),
}

/// Whether the file starts with the line `<id><suffix>`.
fn first_line_is(file: &File, id: &str, suffix: &str) -> Result<(), FirstLine> {
    let want = format!("{id}{suffix}\n");
    let mut buf = vec![0u8; want.len().max(QUOTE_MAX)];
    let mut got = 0;
    let mut f = file;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FirstLine::Unreadable(e)),
        }
    }
    let buf = &buf[..got];
    if buf.starts_with(want.as_bytes()) {
        return Ok(());
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    Err(FirstLine::Other(format!(
        "first line {:?}",
        String::from_utf8_lossy(line)
    )))
}

// ---------------------------------------------------------------------------
// Placement helpers

/// Single-character subdirectories of `dir` (not following symlinks).
///
/// Probes the 62 possible names with lstat instead of reading `dir`: a busy
/// sub-queue holds thousands of files, and placement asks this per message.
fn single_char_subdirs(dir: &Path) -> Vec<PathBuf> {
    (b'0'..=b'9')
        .chain(b'A'..=b'Z')
        .chain(b'a'..=b'z')
        .map(|c| dir.join((c as char).to_string()))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .collect()
}

/// Hash depth in use under `base`: 0, 1 or 2.
fn hash_depth(base: &Path) -> usize {
    let level1 = single_char_subdirs(base);
    if level1.is_empty() {
        0
    } else if level1.iter().any(|d| !single_char_subdirs(d).is_empty()) {
        2
    } else {
        1
    }
}

/// `base` plus Postfix's hash directories for `queue_id` at `depth`.
fn postfix_hashed(mut base: PathBuf, queue_id: &str, depth: usize) -> PathBuf {
    let key = postfix_hash_key(queue_id);
    let mut chars = key.chars();
    for _ in 0..depth {
        // Like Postfix's dir_forest: '_' once the key runs out.
        base.push(chars.next().unwrap_or('_').to_string());
    }
    base
}

/// The string Postfix hashes a queue ID by: a short ID itself; for a long ID
/// (time part, `z`, inode part) the microseconds field as 5 hex digits.
fn postfix_hash_key(queue_id: &str) -> String {
    match queue_id.rfind('z') {
        Some(z) if z >= POSTFIX_LONG_TIME_LEN => {
            let usec = &queue_id.as_bytes()[z - 4..z];
            // Like strtoul: the leading valid digits count.
            let mut v: u64 = 0;
            for c in usec {
                let Some(d) = POSTFIX_B52.iter().position(|a| a == c) else {
                    break;
                };
                v = v * 52 + d as u64;
            }
            format!("{v:05X}")
        }
        _ => queue_id.to_owned(),
    }
}

/// The character Exim's `split_spool_directory` uses: the 6th of the ID
/// (the last of the time segment).
fn exim_split_char(queue_id: &str) -> Option<char> {
    queue_id.chars().nth(5).filter(char::is_ascii_alphanumeric)
}

/// A bijective 64-bit mix (SplitMix64's finalizer).
fn mix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `v` in `alphabet`, exactly `width` digits (the caller keeps `v` in range).
fn encode_fixed(out: &mut String, mut v: u64, alphabet: &[u8], width: usize) {
    let base = alphabet.len() as u64;
    let mut digits = vec![b'0'; width];
    for d in digits.iter_mut().rev() {
        *d = alphabet[(v % base) as usize];
        v /= base;
    }
    debug_assert_eq!(v, 0, "value does not fit {width} digits");
    out.extend(digits.into_iter().map(char::from));
}

/// `v` in `alphabet`, as few digits as needed (at least one).
fn encode_min(out: &mut String, mut v: u64, alphabet: &[u8]) {
    let base = alphabet.len() as u64;
    let mut digits = Vec::new();
    loop {
        digits.push(alphabet[(v % base) as usize]);
        v /= base;
        if v == 0 {
            break;
        }
    }
    out.extend(digits.into_iter().rev().map(char::from));
}

#[cfg(test)]
#[path = "layout_tests.rs"]
mod tests;
