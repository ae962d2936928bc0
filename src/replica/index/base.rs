//! The index's base: every entry as the index file last saved it, sorted
//! by path, read from the file one block of [`BLOCK`] entries at a time.
//!
//! What the base holds in memory is one key and one offset per block (a
//! million-file store: about 16,000 of each) and the last block it
//! decoded; the entries stay in the file (the page cache). The index keeps
//! what changed since in memory and [`merge`]s the two into a new file now
//! and then. A store kept in memory (the simulator, tests) holds the same
//! bytes in a buffer instead of a file.
//!
//! File format (version 2; version 1, with the count in the header, is
//! still read): `HSIX` | version u32 | entries | entry count u64 | xxh3-64
//! of everything before it. Each entry: `path length u16 | path bytes |
//! kind u8 | synced u8 | size u64 | mtime s i64, ns u32 | inode u64 | ctime
//! s i64, ns u32 | mode, uid, gid u32 | hash u128`, little-endian, in
//! [`path_order`](crate::model::path_order). Names are the bytes the
//! filesystem has (a name need not be UTF-8).

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{join128, split128, Entry, IndexError, Kind, Version};

pub(super) const MAGIC: &[u8; 4] = b"HSIX";
/// The version this release writes.
pub(super) const FORMAT_VERSION: u32 = 2;
/// Fixed bytes of one entry after its path.
pub(super) const ENTRY_FIXED: usize = 2 + 8 + 12 + 8 + 12 + 12 + 16;
/// Entries per block: one bit word of walk marks, about 8 KiB of file.
pub(super) const BLOCK: usize = 64;
/// No ordinal (an entry dropped by a merge).
pub(super) const NONE: u32 = u32::MAX;

/// A path as a key whose byte order is [`path_order`](crate::model::path_order):
/// `/` (which sorts before every other byte there) becomes 0, which no
/// name contains.
pub(crate) fn key_of(p: &Path) -> Box<[u8]> {
    p.as_os_str()
        .as_bytes()
        .iter()
        .map(|&c| if c == b'/' { 0 } else { c })
        .collect()
}

/// The path a [`key_of`] key stands for.
pub(crate) fn path_of(k: &[u8]) -> PathBuf {
    let raw: Vec<u8> = k.iter().map(|&c| if c == 0 { b'/' } else { c }).collect();
    PathBuf::from(std::ffi::OsString::from(OsStr::from_bytes(&raw)))
}

/// Is the key `k` the key `of` or one below it?
pub(crate) fn key_under(k: &[u8], of: &[u8]) -> bool {
    k.starts_with(of) && (k.len() == of.len() || k[of.len()] == 0)
}

/// Where a base's bytes are.
#[derive(Clone, Debug)]
enum Src {
    Empty,
    File(Arc<File>),
    Bytes(Arc<[u8]>),
}

impl Src {
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        match self {
            Src::Empty => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Src::File(f) => f.read_exact_at(buf, at),
            Src::Bytes(b) => {
                let s = usize::try_from(at)
                    .ok()
                    .and_then(|a| b.get(a..a.checked_add(buf.len())?))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                buf.copy_from_slice(s);
                Ok(())
            }
        }
    }
}

/// One block's entries, decoded.
type Block = Vec<(Box<[u8]>, Entry)>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The sorted entries of the last save (see the module's text).
#[derive(Debug)]
pub(super) struct Base {
    src: Src,
    /// Entries in the base.
    count: u64,
    /// First key and byte offset of each block.
    blocks: Arc<Vec<(Box<[u8]>, u64)>>,
    /// Offset just past the last entry.
    end: u64,
    /// Which base this is (a background merge applies to the base it read).
    pub id: u64,
    /// The block decoded last (a walk asks for entries in order).
    cache: RefCell<Option<(usize, Block)>>,
}

impl Clone for Base {
    fn clone(&self) -> Base {
        Base {
            src: self.src.clone(),
            count: self.count,
            blocks: self.blocks.clone(),
            end: self.end,
            id: self.id,
            cache: RefCell::new(None),
        }
    }
}

impl Base {
    pub fn empty() -> Base {
        Base {
            src: Src::Empty,
            count: 0,
            blocks: Arc::new(Vec::new()),
            end: 0,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cache: RefCell::new(None),
        }
    }

    /// A base of `count` entries in `src` (a new id).
    fn made(src: Src, count: u64, blocks: Vec<(Box<[u8]>, u64)>, end: u64) -> Base {
        Base {
            src,
            count,
            blocks: Arc::new(blocks),
            end,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cache: RefCell::new(None),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Opens an index file, checking all of it (checksum, then every
    /// entry and the order) before anything is trusted.
    pub fn open(file: &Path) -> Result<Base, IndexError> {
        let io_err = |source| IndexError::Io {
            file: file.to_path_buf(),
            source,
        };
        let f = File::open(file).map_err(io_err)?;
        let len = f.metadata().map_err(io_err)?.len();
        let f = Arc::new(f);
        check_and_index(file, Src::File(f), len)
    }

    /// A base held in memory (a store kept in memory; tools).
    pub fn from_bytes(file: &Path, bytes: Arc<[u8]>) -> Result<Base, IndexError> {
        let len = bytes.len() as u64;
        check_and_index(file, Src::Bytes(bytes), len)
    }

    fn read_block(&self, b: usize) -> io::Result<Block> {
        let (_, at) = &self.blocks[b];
        let end = self.blocks.get(b + 1).map_or(self.end, |(_, o)| *o);
        let mut buf = vec![0; (end - at) as usize];
        self.src.read_at(&mut buf, *at)?;
        let n = (self.count as usize - b * BLOCK).min(BLOCK);
        let mut out = Vec::with_capacity(n);
        let mut pos = 0;
        for _ in 0..n {
            let (raw, e) = decode_at(&buf, &mut pos).map_err(io::Error::other)?;
            out.push((key_of(Path::new(OsStr::from_bytes(raw))), e));
        }
        Ok(out)
    }

    /// Runs `f` on block `b` (decoded once for a run of lookups in it).
    /// A block that cannot be read (the file changed under the daemon, a
    /// failing disk) is empty: the index then knows less, which costs
    /// hashing and caution, never a wrong answer about a file.
    fn with_block<R>(&self, b: usize, f: impl FnOnce(&[(Box<[u8]>, Entry)]) -> R) -> R {
        let mut cache = self.cache.borrow_mut();
        if cache.as_ref().is_none_or(|(at, _)| *at != b) {
            let entries = self.read_block(b).unwrap_or_else(|e| {
                tracing::error!("index block {b} unreadable ({e}); treated as empty");
                Vec::new()
            });
            *cache = Some((b, entries));
        }
        f(&cache.as_ref().expect("just filled").1)
    }

    /// The block that would hold `key`.
    fn block_of(&self, key: &[u8]) -> Option<usize> {
        self.blocks
            .partition_point(|(k, _)| **k <= *key)
            .checked_sub(1)
    }

    /// The entry at `key`, with its ordinal.
    pub fn find(&self, key: &[u8]) -> Option<(u64, Entry)> {
        let b = self.block_of(key)?;
        self.with_block(b, |es| {
            es.binary_search_by(|(k, _)| (**k).cmp(key))
                .ok()
                .map(|i| ((b * BLOCK + i) as u64, es[i].1.clone()))
        })
    }

    /// The key at ordinal `ord`.
    pub fn key_at(&self, ord: u64) -> Option<Box<[u8]>> {
        let b = (ord / BLOCK as u64) as usize;
        if b >= self.blocks.len() {
            return None;
        }
        self.with_block(b, |es| es.get(ord as usize % BLOCK).map(|(k, _)| k.clone()))
    }

    /// Entries from `key` on (in order), with their ordinals.
    pub fn range_from(&self, key: &[u8]) -> Range {
        let b = self.block_of(key).unwrap_or(0);
        let mut r = Range {
            base: self.clone(),
            block: b,
            entries: Vec::new().into_iter(),
            ord: (b * BLOCK) as u64,
        };
        r.load();
        // Skip what sorts before `key` in its block.
        let skip = r.entries.as_slice().partition_point(|(k, _)| **k < *key);
        if skip > 0 {
            r.entries.nth(skip - 1);
            r.ord += skip as u64;
        }
        r
    }
}

impl Base {
    /// The base entries `keep` takes, in order, with their ordinals: the
    /// file read in pieces of about 1 MiB and only what is kept decoded
    /// whole (a million entries in tens of milliseconds, for what is rare
    /// but needs all of them: the other name of a hard link).
    pub fn select(&self, mut keep: impl FnMut(&Entry) -> bool) -> Vec<(u64, Box<[u8]>, Entry)> {
        let mut out = Vec::new();
        let mut b = 0;
        let mut buf = Vec::new();
        while b < self.blocks.len() {
            let at = self.blocks[b].1;
            let mut c = b + 1;
            while c < self.blocks.len() && self.blocks[c].1 - at < 1 << 20 {
                c += 1;
            }
            let end = self.blocks.get(c).map_or(self.end, |(_, o)| *o);
            buf.resize((end - at) as usize, 0);
            if let Err(e) = self.src.read_at(&mut buf, at) {
                tracing::error!("index blocks {b}..{c} unreadable ({e}); treated as empty");
                b = c;
                continue;
            }
            let n = ((self.count as usize) - b * BLOCK).min((c - b) * BLOCK);
            let mut pos = 0;
            for i in 0..n {
                match decode_at(&buf, &mut pos) {
                    Ok((raw, e)) => {
                        if keep(&e) {
                            let key = key_of(Path::new(OsStr::from_bytes(raw)));
                            out.push(((b * BLOCK + i) as u64, key, e));
                        }
                    }
                    Err(e) => {
                        tracing::error!("index blocks {b}..{c} unreadable ({e}); treated as empty");
                        break;
                    }
                }
            }
            b = c;
        }
        out
    }
}

/// Base entries in order from some key (see [`Base::range_from`]); owns
/// its own block, so it can run on another thread.
pub(super) struct Range {
    base: Base,
    block: usize,
    entries: std::vec::IntoIter<(Box<[u8]>, Entry)>,
    ord: u64,
}

impl Range {
    fn load(&mut self) {
        self.entries = if self.block < self.base.blocks.len() {
            self.base.read_block(self.block).unwrap_or_else(|e| {
                tracing::error!(
                    "index block {} unreadable ({e}); treated as empty",
                    self.block
                );
                Vec::new()
            })
        } else {
            Vec::new()
        }
        .into_iter();
        self.ord = (self.block * BLOCK) as u64;
    }
}

impl Iterator for Range {
    type Item = (u64, Box<[u8]>, Entry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, e)) = self.entries.next() {
                let ord = self.ord;
                self.ord += 1;
                return Some((ord, k, e));
            }
            if self.block + 1 >= self.base.blocks.len() {
                return None;
            }
            self.block += 1;
            self.load();
        }
    }
}

/// A file read from its start whatever its cursor (a base's file is
/// read by position).
struct At<'a> {
    f: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads a stream, remembering how far it is.
struct Counted<R> {
    r: R,
    at: u64,
}

impl<R: Read> Counted<R> {
    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.r.read_exact(buf)?;
        self.at += buf.len() as u64;
        Ok(())
    }
}

/// Checks a whole index (checksum first, then each entry and the order)
/// and builds the block table.
fn check_and_index(file: &Path, src: Src, len: u64) -> Result<Base, IndexError> {
    let corrupt = |offset: u64, entry: u64, problem: String| IndexError::Corrupt {
        file: file.to_path_buf(),
        offset: offset as usize,
        entry,
        problem,
    };
    let io_err = |source| IndexError::Io {
        file: file.to_path_buf(),
        source,
    };
    if len < 16 + 8 {
        return Err(corrupt(0, 0, format!("only {len} bytes")));
    }
    let reader = || -> Box<dyn Read + '_> {
        match &src {
            Src::File(f) => Box::new(BufReader::with_capacity(1 << 20, At { f, pos: 0 })),
            Src::Bytes(b) => Box::new(&b[..]),
            Src::Empty => Box::new(io::empty()),
        }
    };
    let body_len = len - 8;
    // 1: the checksum over everything before it.
    let mut r = reader();
    let mut head = [0u8; 8];
    r.read_exact(&mut head).map_err(io_err)?;
    if &head[..4] != MAGIC {
        return Err(corrupt(0, 0, "not a hasync index (bad magic)".into()));
    }
    let mut sum = xxhash_rust::xxh3::Xxh3::new();
    sum.update(&head);
    let mut left = body_len - 8;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n]).map_err(io_err)?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = [0u8; 8];
    r.read_exact(&mut trailer).map_err(io_err)?;
    if sum.digest() != u64::from_le_bytes(trailer) {
        return Err(corrupt(
            body_len,
            0,
            "checksum mismatch (torn or damaged file)".into(),
        ));
    }
    drop(r);
    // 2: the entries, in order.
    let version = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let mut r = Counted { r: reader(), at: 0 };
    r.take(&mut head).map_err(io_err)?;
    let (start, end, count) = match version {
        1 => {
            let mut c = [0u8; 8];
            r.take(&mut c).map_err(io_err)?;
            (16, body_len, u64::from_le_bytes(c))
        }
        2 => {
            let mut c = [0u8; 8];
            src.read_at(&mut c, body_len - 8).map_err(io_err)?;
            (8, body_len - 8, u64::from_le_bytes(c))
        }
        v => return Err(corrupt(4, 0, format!("unknown format version {v}"))),
    };
    // Each entry takes at least its fixed part: a count the file cannot
    // hold is refused before anything is reserved.
    if count > (end - start) / (2 + ENTRY_FIXED) as u64 {
        return Err(corrupt(8, 0, format!("{count} entries cannot fit")));
    }
    let mut blocks = Vec::with_capacity((count as usize).div_ceil(BLOCK));
    let mut prev: Option<Box<[u8]>> = None;
    let mut raw = Vec::new();
    let mut fixed = [0u8; ENTRY_FIXED];
    for n in 0..count {
        let at = r.at;
        let truncated = |_| corrupt(at, n, "truncated entry".into());
        if at + 2 > end {
            return Err(corrupt(at, n, "truncated entry".into()));
        }
        let mut l = [0u8; 2];
        r.take(&mut l).map_err(truncated)?;
        let plen = u16::from_le_bytes(l) as u64;
        if r.at + plen + ENTRY_FIXED as u64 > end {
            return Err(corrupt(at, n, "truncated entry".into()));
        }
        raw.resize(plen as usize, 0);
        r.take(&mut raw).map_err(truncated)?;
        r.take(&mut fixed).map_err(truncated)?;
        check_path(&raw).map_err(|p| corrupt(at, n, p))?;
        decode_fixed(&fixed).map_err(|p| corrupt(at, n, p))?;
        let key = key_of(Path::new(OsStr::from_bytes(&raw)));
        if let Some(p) = &prev {
            if **p >= *key {
                return Err(corrupt(
                    at,
                    n,
                    if **p == *key {
                        "path listed twice".into()
                    } else {
                        "entries out of order".into()
                    },
                ));
            }
        }
        if (n as usize).is_multiple_of(BLOCK) {
            blocks.push((key.clone(), at));
        }
        prev = Some(key);
    }
    let at = r.at;
    drop(r);
    if at != end {
        return Err(corrupt(at, count, format!("{} trailing bytes", end - at)));
    }
    Ok(Base::made(src, count, blocks, end))
}

fn check_path(raw: &[u8]) -> Result<(), String> {
    if raw.is_empty() || raw.contains(&0) || raw.first() == Some(&b'/') {
        return Err("bad path".into());
    }
    Ok(())
}

/// One entry from `buf` at `pos` (checked when the file was opened; a
/// block read later is checked again).
fn decode_at<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(&'a [u8], Entry), String> {
    let mut take = |len: usize| -> Result<&'a [u8], String> {
        let s = buf
            .get(*pos..*pos + len)
            .ok_or_else(|| "truncated entry".to_string())?;
        *pos += len;
        Ok(s)
    };
    let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
    let raw = take(len)?;
    check_path(raw)?;
    let e = decode_fixed(take(ENTRY_FIXED)?)?;
    Ok((raw, e))
}

fn decode_fixed(f: &[u8]) -> Result<Entry, String> {
    let u64_at = |i: usize| u64::from_le_bytes(f[i..i + 8].try_into().expect("8"));
    let u32_at = |i: usize| u32::from_le_bytes(f[i..i + 4].try_into().expect("4"));
    let kind = match f[0] {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::Symlink,
        k => return Err(format!("unknown kind {k}")),
    };
    let synced = match f[1] {
        0 => false,
        1 => true,
        b => return Err(format!("bad synced flag {b}")),
    };
    Ok(Entry {
        kind,
        version: Version {
            size: u64_at(2),
            mtime_s: u64_at(10) as i64,
            mtime_ns: u32_at(18),
            ino: u64_at(22),
            ctime_s: u64_at(30) as i64,
            ctime_ns: u32_at(38),
        },
        mode: u32_at(42),
        uid: u32_at(46),
        gid: u32_at(50),
        hash: split128(u128::from_le_bytes(f[54..70].try_into().expect("16"))),
        synced,
        mark: 0,
    })
}

pub(super) fn encode_entry(out: &mut Vec<u8>, raw: &[u8], e: &Entry) {
    out.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    out.extend_from_slice(raw);
    out.push(match e.kind {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
    });
    out.push(u8::from(e.synced));
    let v = &e.version;
    out.extend_from_slice(&v.size.to_le_bytes());
    out.extend_from_slice(&v.mtime_s.to_le_bytes());
    out.extend_from_slice(&v.mtime_ns.to_le_bytes());
    out.extend_from_slice(&v.ino.to_le_bytes());
    out.extend_from_slice(&v.ctime_s.to_le_bytes());
    out.extend_from_slice(&v.ctime_ns.to_le_bytes());
    out.extend_from_slice(&e.mode.to_le_bytes());
    out.extend_from_slice(&e.uid.to_le_bytes());
    out.extend_from_slice(&e.gid.to_le_bytes());
    out.extend_from_slice(&join128(e.hash).to_le_bytes());
}

/// One change since the base, as a merge takes it: the key and the entry
/// (`None`: gone).
pub(super) type Change = (Box<[u8]>, Option<Entry>);

/// What a [`merge`] wrote: the new base, and where each old entry and
/// each change went in it ([`NONE`]: dropped), to carry walk marks over.
pub(super) struct Written {
    pub base: Base,
    pub from: u64,
    pub old_to_new: Vec<u32>,
    /// Per change, in order.
    pub placed: Vec<u32>,
}

/// Where a merge writes.
pub(super) enum Out<'a> {
    /// The index file, atomically and durably.
    File(&'a Path),
    /// A buffer (a store kept in memory).
    Bytes,
}

/// Writes `old` with `changes` (sorted by key) applied as a new base.
pub(super) fn merge(old: &Base, changes: &[Change], out: Out<'_>) -> io::Result<Written> {
    let mut old_to_new = vec![NONE; old.count as usize];
    let mut placed = vec![NONE; changes.len()];
    let mut blocks = Vec::new();
    let mut count: u64 = 0;
    let mut end: u64 = 0;
    let mut fill = |w: &mut dyn Write| -> io::Result<()> {
        let mut sum = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut at: u64 = 0;
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let mut olds = old.range_from(&[]).peekable();
        let mut news = changes.iter().enumerate().peekable();
        let mut raw = Vec::new();
        loop {
            // The next entry in key order; a change replaces the old entry.
            let (key, entry, ord) = match (olds.peek(), news.peek()) {
                (None, None) => break,
                (Some(_), None) => {
                    let (o, k, e) = olds.next().expect("peeked");
                    (k, Some(e), Err(o))
                }
                (Some((_, ok, _)), Some((_, (nk, _)))) if **ok < **nk => {
                    let (o, k, e) = olds.next().expect("peeked");
                    (k, Some(e), Err(o))
                }
                (o, Some((_, (nk, _)))) => {
                    if o.is_some_and(|(_, ok, _)| **ok == **nk) {
                        olds.next();
                    }
                    let (i, (k, e)) = news.next().expect("peeked");
                    (k.clone(), e.clone(), Ok(i))
                }
            };
            let Some(entry) = entry else { continue };
            raw.clear();
            raw.extend(key.iter().map(|&c| if c == 0 { b'/' } else { c }));
            if raw.len() > u16::MAX as usize {
                // Cannot be replicated either (longer than any path the
                // wire carries); leaving it out only costs a re-hash.
                continue;
            }
            let n = u32::try_from(count).map_err(|_| io::Error::other("index too large"))?;
            match ord {
                Err(o) => old_to_new[o as usize] = n,
                Ok(i) => placed[i] = n,
            }
            if (count as usize).is_multiple_of(BLOCK) {
                blocks.push((key, at + buf.len() as u64));
            }
            count += 1;
            encode_entry(&mut buf, &raw, &entry);
            if buf.len() >= 60 * 1024 {
                sum.update(&buf);
                w.write_all(&buf)?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
        end = at + buf.len() as u64;
        buf.extend_from_slice(&count.to_le_bytes());
        sum.update(&buf);
        buf.extend_from_slice(&sum.digest().to_le_bytes());
        w.write_all(&buf)
    };
    let src = match out {
        Out::File(file) => {
            crate::io::write_atomic_with(file, fill)?;
            Src::File(Arc::new(File::open(file)?))
        }
        Out::Bytes => {
            let mut v = Vec::new();
            fill(&mut v)?;
            Src::Bytes(v.into())
        }
    };
    Ok(Written {
        base: Base::made(src, count, blocks, end),
        from: old.id,
        old_to_new,
        placed,
    })
}
