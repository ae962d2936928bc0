//! Deterministic Maildir fixtures and workloads (same seed, same tree), for
//! the demo, the tests and the benchmarks.
//!
//! Message sizes follow a lognormal-like distribution (median ~10 KiB by
//! default, clipped to 512 B .. 4 MiB) with the occasional large attachment.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::failover::sim::SimRng;

/// Shape of a generated Maildir tree.
#[derive(Debug, Clone)]
pub struct MaildirSpec {
    pub seed: u64,
    pub mailboxes: usize,
    pub messages: usize,
    /// Median message size in bytes.
    pub median_size: u64,
    pub min_size: u64,
    pub max_size: u64,
}

impl Default for MaildirSpec {
    fn default() -> Self {
        MaildirSpec {
            seed: 1,
            mailboxes: 20,
            messages: 1000,
            median_size: 10 * 1024,
            min_size: 512,
            max_size: 4 << 20,
        }
    }
}

/// A lognormal-like size: exp(N(ln median, 1)), clipped; 1 in 200 is a big
/// attachment near the top of the range.
pub fn message_size(rng: &mut SimRng, spec: &MaildirSpec) -> u64 {
    if rng.range(0, 199) == 0 {
        return rng.range(spec.max_size / 4, spec.max_size);
    }
    // Box-Muller from two uniforms in (0, 1].
    let u1 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let z = (-2.0 * u1.max(1e-12).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let size = (spec.median_size as f64 * z.exp()) as u64;
    size.clamp(spec.min_size, spec.max_size)
}

/// A message body: RFC 5322-ish headers, then pseudo-random text.
pub fn message(rng: &mut SimRng, size: u64) -> Vec<u8> {
    let mut m = format!(
        "Return-Path: <sender{}@example.net>\r\nMessage-ID: <{:016x}@example.net>\r\nSubject: fixture {}\r\n\r\n",
        rng.range(0, 999),
        rng.next_u64(),
        rng.next_u64() % 100_000
    )
    .into_bytes();
    const WORDS: [&[u8]; 8] = [
        b"mail ",
        b"queue ",
        b"relay ",
        b"spam ",
        b"archive ",
        b"inbox ",
        b"deliver ",
        b"ok\r\n",
    ];
    while (m.len() as u64) < size {
        m.extend_from_slice(WORDS[rng.range(0, 7) as usize]);
    }
    m.truncate(size as usize);
    m
}

/// Dovecot-style unique name: `<time>.M<usec>P<pid>.<host>`.
pub fn unique_name(rng: &mut SimRng, n: u64) -> String {
    format!(
        "{}.M{}P{}Q{n}.mx.example.net,S={}",
        1_700_000_000 + n,
        rng.range(0, 999_999),
        rng.range(100, 65_000),
        rng.range(512, 4 << 20)
    )
}

/// The mailbox directory of mailbox `i` (a Maildir with cur/new/tmp).
pub fn mailbox(root: &Path, i: usize) -> PathBuf {
    root.join(format!("user{i:04}")).join("Maildir")
}

/// Builds the tree; returns (files, bytes).
pub fn generate_maildirs(root: &Path, spec: &MaildirSpec) -> io::Result<(u64, u64)> {
    let mut rng = SimRng::new(spec.seed);
    for i in 0..spec.mailboxes {
        for d in ["cur", "new", "tmp"] {
            fs::create_dir_all(mailbox(root, i).join(d))?;
        }
        fs::write(
            mailbox(root, i).join("dovecot-uidlist"),
            format!("3 V{} N1\n", 1_700_000_000 + i),
        )?;
    }
    let (mut files, mut bytes) = (spec.mailboxes as u64, 0u64);
    for n in 0..spec.messages {
        let mb = mailbox(root, rng.range(0, spec.mailboxes as u64 - 1) as usize);
        let size = message_size(&mut rng, spec);
        let name = unique_name(&mut rng, n as u64);
        // Most mail has been read: cur/ with flags; some is still new/.
        let path = if rng.percent(70) {
            mb.join("cur").join(format!("{name}:2,S"))
        } else {
            mb.join("new").join(name)
        };
        fs::write(&path, message(&mut rng, size))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        files += 1;
        bytes += size;
    }
    Ok((files, bytes))
}

/// What a workload step did (for counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Deliver,
    MoveToCur,
    FlagRename,
    Delete,
    DirRename,
    HardLinkCopy,
    RewriteInPlace,
    LargeFile,
    EmptyFile,
}

/// Random mail activity on a Maildir tree, the way an MTA, an IMAP server
/// and users change it.
pub struct Workload {
    root: PathBuf,
    rng: SimRng,
    n: u64,
    spec: MaildirSpec,
    /// Allow directory renames (folder renames).
    pub dir_renames: bool,
}

impl Workload {
    pub fn new(root: &Path, spec: MaildirSpec) -> Workload {
        Workload {
            root: root.to_path_buf(),
            rng: SimRng::new(spec.seed ^ 0xD1CE),
            n: 1_000_000,
            spec,
            dir_renames: true,
        }
    }

    fn random_file_in(&mut self, sub: &str) -> Option<PathBuf> {
        let mb = mailbox(
            &self.root,
            self.rng.range(0, self.spec.mailboxes as u64 - 1) as usize,
        );
        let mut names: Vec<_> = fs::read_dir(mb.join(sub))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        if names.is_empty() {
            return None;
        }
        names.sort();
        Some(names.swap_remove(self.rng.range(0, names.len() as u64 - 1) as usize))
    }

    /// Delivers one message the Maildir way: write in tmp/, rename into new/.
    pub fn deliver(&mut self, size: u64) -> io::Result<PathBuf> {
        let mb = mailbox(
            &self.root,
            self.rng.range(0, self.spec.mailboxes as u64 - 1) as usize,
        );
        self.n += 1;
        let name = unique_name(&mut self.rng, self.n);
        let tmp = mb.join("tmp").join(&name);
        fs::write(&tmp, message(&mut self.rng, size))?;
        let new = mb.join("new").join(&name);
        fs::rename(&tmp, &new)?;
        Ok(new)
    }

    /// One random step.
    pub fn step(&mut self) -> io::Result<Step> {
        let pick = self.rng.range(0, 99);
        let step = match pick {
            0..=29 => Step::Deliver,
            30..=44 => Step::MoveToCur,
            45..=59 => Step::FlagRename,
            60..=69 => Step::Delete,
            70..=71 if self.dir_renames => Step::DirRename,
            72..=76 => Step::HardLinkCopy,
            77..=81 => Step::RewriteInPlace,
            82 => Step::LargeFile,
            83..=85 => Step::EmptyFile,
            _ => Step::Deliver,
        };
        match step {
            Step::Deliver => {
                let size = message_size(&mut self.rng, &self.spec);
                self.deliver(size)?;
            }
            Step::LargeFile => {
                let size = self.rng.range(1 << 20, 3 << 20);
                self.deliver(size)?;
            }
            Step::EmptyFile => {
                self.deliver(0)?;
            }
            Step::MoveToCur => {
                if let Some(p) = self.random_file_in("new") {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    let cur = p
                        .parent()
                        .unwrap()
                        .parent()
                        .unwrap()
                        .join("cur")
                        .join(format!("{name}:2,"));
                    fs::rename(&p, cur)?;
                }
            }
            Step::FlagRename => {
                if let Some(p) = self.random_file_in("cur") {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    let base = name.split(":2,").next().unwrap_or(&name).to_string();
                    let flags = ["S", "RS", "FS", "DS", ""][self.rng.range(0, 4) as usize];
                    let to = p.with_file_name(format!("{base}:2,{flags}"));
                    if to != p {
                        fs::rename(&p, to)?;
                    }
                }
            }
            Step::Delete => {
                if let Some(p) = self.random_file_in("cur") {
                    fs::remove_file(p)?;
                }
            }
            Step::DirRename => {
                // Rename a folder below a mailbox (IMAP RENAME of a subfolder).
                let i = self.rng.range(0, self.spec.mailboxes as u64 - 1) as usize;
                let mb = mailbox(&self.root, i);
                let from = mb.join(".Archive");
                let to = mb.join(".Archive2");
                if from.exists() {
                    fs::rename(&from, &to)?;
                } else if to.exists() {
                    fs::rename(&to, &from)?;
                } else {
                    for d in ["cur", "new", "tmp"] {
                        fs::create_dir_all(from.join(d))?;
                    }
                    let mut rng = SimRng::new(self.rng.next_u64());
                    fs::write(
                        from.join("cur").join("1.M1.archived:2,S"),
                        message(&mut rng, 2000),
                    )?;
                }
            }
            Step::HardLinkCopy => {
                // Dovecot copies a message between folders with link().
                if let Some(p) = self.random_file_in("cur") {
                    let i = self.rng.range(0, self.spec.mailboxes as u64 - 1) as usize;
                    let dst = mailbox(&self.root, i).join("cur").join(format!(
                        "{}.copy{}:2,S",
                        self.n,
                        self.rng.range(0, 1 << 30)
                    ));
                    self.n += 1;
                    if p.parent() != dst.parent() || p != dst {
                        fs::hard_link(&p, &dst)?;
                    }
                }
            }
            Step::RewriteInPlace => {
                // dovecot-uidlist and index files are rewritten in place.
                let i = self.rng.range(0, self.spec.mailboxes as u64 - 1) as usize;
                let p = mailbox(&self.root, i).join("dovecot-uidlist");
                fs::write(
                    &p,
                    format!(
                        "3 V{} N{}\n",
                        1_700_000_000 + i,
                        self.rng.range(2, 1_000_000)
                    ),
                )?;
            }
        }
        Ok(step)
    }
}

/// What a replica must reproduce of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    pub kind: &'static str,
    pub hash: u128,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files and folders (but Maildir `tmp/`, whose entries are excluded).
    pub mtime_ns: Option<i128>,
    /// Other names of the same inode (hard links), sorted.
    pub links: Vec<String>,
}

/// Content hash, metadata and hard-link groups of a mailstore tree, leaving
/// out hasync's own directory and Maildir `tmp/` contents (not replicated).
pub fn digest(root: &Path) -> std::collections::BTreeMap<String, PathState> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::HashMap<u64, Vec<String>> = Default::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        // Trees are read while they may still change: skip what vanishes.
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let Ok(e) = e else { continue };
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n == "tmp")
            {
                continue;
            }
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let (kind, hash, mtime) = if md.is_dir() {
                stack.push(p.clone());
                // A Maildir tmp/ changes with entries that are not
                // replicated (excluded): its mtime is not the replica's.
                let t = (p.file_name().is_none_or(|n| n != "tmp"))
                    .then(|| md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128);
                ("dir", 0, t)
            } else if md.file_type().is_symlink() {
                let Ok(t) = std::fs::read_link(&p) else {
                    continue;
                };
                (
                    "symlink",
                    xxhash_rust::xxh3::xxh3_128(t.as_os_str().as_encoded_bytes()),
                    None,
                )
            } else {
                inodes.entry(md.ino()).or_default().push(rel.clone());
                let Ok(data) = std::fs::read(&p) else {
                    continue;
                };
                (
                    "file",
                    xxhash_rust::xxh3::xxh3_128(&data),
                    Some(md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128),
                )
            };
            out.insert(
                rel,
                PathState {
                    kind,
                    hash,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime_ns: mtime,
                    links: vec![],
                },
            );
        }
    }
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        let mut sorted = names.clone();
        sorted.sort();
        for n in &names {
            out.get_mut(n).unwrap().links = sorted.clone();
        }
    }
    out
}

/// Queues `n` messages in `layout` form under `dir` (Postfix: `deferred/` with
/// hash directories, retry times in the mtime, some force-expired (g+x), some
/// on `hold/`; Exim: `input/` `-H`/`-D` pairs; flat: one file each).
pub fn generate_queue(
    layout: crate::queue::layout::Layout,
    dir: &Path,
    n: usize,
    seed: u64,
) -> io::Result<()> {
    use crate::queue::layout::Layout;
    let mut rng = SimRng::new(seed);
    let now = std::time::SystemTime::now();
    for i in 0..n {
        let spec = MaildirSpec::default();
        let size = message_size(&mut rng, &spec).min(256 * 1024);
        let body = message(&mut rng, size);
        match layout {
            Layout::Flat => fs::write(dir.join(format!("Q{seed:02}{i:06X}")), &body)?,
            Layout::Postfix => {
                let id = format!("{:X}{:07X}", 0xA + (seed % 6), i);
                let (sub, mode, retry_s): (&str, u32, i64) = match i % 4 {
                    0 | 1 => ("deferred", 0o700, 3600),
                    2 => ("hold", 0o700, -60),
                    _ => ("deferred", 0o710, 600),
                };
                let d = if sub == "deferred" {
                    dir.join(sub).join(&id[..1])
                } else {
                    dir.join(sub)
                };
                fs::create_dir_all(&d)?;
                let p = d.join(&id);
                fs::write(&p, &body)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                let t = if retry_s >= 0 {
                    now + std::time::Duration::from_secs(retry_s as u64)
                } else {
                    now - std::time::Duration::from_secs(retry_s.unsigned_abs())
                };
                fs::File::options().write(true).open(&p)?.set_modified(t)?;
            }
            Layout::Exim => {
                let id = format!("1v{seed:04}-{i:06}-00");
                let d = dir.join("input");
                fs::create_dir_all(&d)?;
                fs::write(
                    d.join(format!("{id}-H")),
                    format!("{id}-H\nmailnull 47 12\n<sender@example.net>\n"),
                )?;
                fs::write(
                    d.join(format!("{id}-D")),
                    [format!("{id}-D\n").as_bytes(), &body].concat(),
                )?;
            }
        }
    }
    Ok(())
}

/// Each queued message's content (all parts, plus mode and, for Postfix,
/// sub-queue and mtime) → how many times it is queued. Exim's first `-H`
/// line names the message and may change with a new ID: left out.
pub fn queue_digest(
    layout: crate::queue::layout::Layout,
    dir: &Path,
) -> io::Result<std::collections::BTreeMap<u128, usize>> {
    use crate::queue::layout::{self, Layout};
    let scan = layout::scan(layout, dir).map_err(io::Error::other)?;
    let mut out = std::collections::BTreeMap::new();
    for m in scan.messages {
        let mut bytes = Vec::new();
        for p in &m.parts {
            let b = fs::read(&p.path)?;
            let skip = if p.suffix.is_empty() {
                0
            } else {
                b.iter().position(|c| *c == b'\n').map_or(0, |x| x + 1)
            };
            bytes.extend_from_slice(&b[skip..]);
            bytes.extend_from_slice(format!("|{:o}|", p.meta.mode).as_bytes());
            if layout == Layout::Postfix {
                bytes.extend_from_slice(format!("{}|{}", m.sub_queue, p.meta.mtime_sec).as_bytes());
            }
        }
        *out.entry(xxhash_rust::xxh3::xxh3_128(&bytes)).or_insert(0) += 1;
    }
    Ok(out)
}
