//! Mailstore replication messages, carried in `Kind::Sync` frames on the
//! sync connection (never on the heartbeat connection).
//!
//! Primary → secondary: `Start`, `ManifestRequest`, then a stream of ops
//! (`File` + `Data`…, `Mkdir`, `Delete`, `Rename`, `Link`, `Symlink`), each
//! with a sequence number, and `Barrier`s. Secondary → primary: `Manifest`
//! chunks, `Ack { seq }` once every op up to `seq` is durable, `Need` to
//! re-request a path, `Refused` for an op it would not apply.

use super::codec::{cut_at_char_boundary, Reader, Writer};
use super::{encode_frame, Frame, Kind, WireError};
pub use crate::model::Meta;

/// Longest relative path accepted (PATH_MAX).
pub const PATH_BYTES_MAX: usize = 4096;
/// Largest `Data` chunk.
pub const DATA_BYTES_MAX: usize = super::BULK_PAYLOAD_BYTES_MAX as usize;
/// Most entries in one `Manifest` chunk.
pub const MANIFEST_ENTRIES_MAX: usize = 4096;
/// Most mailstores in one `Start`.
pub const STORES_MAX: usize = 64;
/// Longest free-text reason (`Refused.why`, `ConflictRefused.why`,
/// `QueueAck.detail`); longer
/// text is cut at a character boundary when encoded.
pub const TEXT_BYTES_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
}

/// One path of a manifest. `hash` is the xxh3-128 of a file's content or a
/// symlink's target, 0 for directories. `link`: for a file with more than
/// one name on the replica, an identity its other names share there (its
/// inode number), else 0: the primary compares hard-link groups with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    pub meta: Meta,
    pub hash: u128,
    pub link: u64,
}

/// Why the secondary asks for a path again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedReason {
    /// Content did not match its hash.
    HashMismatch = 1,
    /// A rename or link source was missing on the replica.
    SourceMissing = 2,
    /// The replica's disk is full; retry later.
    NoSpace = 3,
    /// A local I/O error on the replica.
    LocalError = 4,
    /// An unsure `Delete` held: the replica's only copy of what it
    /// removes may have moved on to a name still on its way. Sent again
    /// after the queue's turn, as a sure delete, if the name is still gone.
    MayHaveMoved = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMsg {
    /// First message of a sync session: the stores it replicates and the
    /// epoch of the primary tenure sending it (the fencing token: a
    /// replica that has seen a higher epoch refuses the session).
    Start {
        stores: Vec<String>,
        epoch: u64,
    },
    ManifestRequest {
        id: u64,
        full_verify: bool,
    },
    /// `apart`: the name must hold an inode of its own on the replica,
    /// shared with no other name there: the primary's file has no other
    /// name, or its names are joined there with names apart here. Without
    /// it, a name whose file there already holds this content and
    /// metadata keeps it, links and all.
    File {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        meta: Meta,
        size: u64,
        hash: u128,
        apart: bool,
    },
    Data {
        seq: u64,
        bytes: Vec<u8>,
    },
    Mkdir {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        meta: Meta,
    },
    /// `unsure`: the primary found the name gone without knowing whether
    /// it was deleted or renamed to a name not sent yet (a tracker event
    /// not read, a name queued behind): the replica may hold it
    /// ([`NeedReason::MayHaveMoved`]) until its content lands elsewhere.
    Delete {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        unsure: bool,
    },
    Rename {
        seq: u64,
        store: u16,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// `path` becomes another name of `existing`'s inode, whose content
    /// hashes to `hash` and whose metadata is `meta`: the replica links
    /// only if `existing` holds that content with that mtime (an earlier op
    /// on it may have failed there, or it may be another inode with the
    /// same content: a message renamed over a copy of itself).
    Link {
        seq: u64,
        store: u16,
        existing: Vec<u8>,
        path: Vec<u8>,
        hash: u128,
        meta: Meta,
    },
    Symlink {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        target: Vec<u8>,
        meta: Meta,
    },
    Barrier {
        seq: u64,
    },
    /// The primary has nothing left from its initial sync or verification:
    /// the replica is complete (restore-role waits for this).
    CaughtUp,
    Manifest {
        id: u64,
        store: u16,
        entries: Vec<ManifestEntry>,
        last: bool,
    },
    Ack {
        seq: u64,
    },
    /// The op numbered `seq` did not land; send `path` again.
    Need {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        reason: NeedReason,
    },
    Refused {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        why: String,
    },
    /// Queue push (former primary → new primary): the layout must match.
    /// `epoch`: the primary tenure the push is addressed to (the new
    /// primary refuses a push meant for another tenure).
    QueueStart {
        layout: u8,
        epoch: u64,
    },
    /// Either side, then the connection closes: the session's epoch is
    /// below `seen` (or, for a queue push, not this primary's tenure).
    Fenced {
        seen: u64,
    },
    /// One queued message; `Data` frames with the same `id` carry its parts'
    /// bytes, in order. `key` is its dedup identity.
    QueueMsg {
        id: u64,
        sub_queue: String,
        queue_id: String,
        key: u128,
        parts: Vec<QueuePart>,
    },
    /// The message is durable in the new primary's queue (or was already).
    QueueAck {
        id: u64,
        outcome: QueueOutcome,
        detail: String,
    },
    QueueEnd,
    QueueEndAck {
        hook_ok: bool,
    },
    /// Secondary → primary, first thing in a session: whether this node
    /// served as primary and has not been reconciled since (its files may
    /// hold changes the primary never got: conflicts are decided exactly),
    /// and the epoch of its last tenure as primary (`None`: not known; 0
    /// on the wire).
    PeerState {
        former_primary: bool,
        served_epoch: Option<u64>,
    },
    /// Primary → secondary: the file or symlink at `path` is a genuine
    /// conflict (a version the primary never held): move it aside before
    /// the ops that follow replace or delete it.
    KeepAside {
        seq: u64,
        store: u16,
        path: Vec<u8>,
    },
    /// Secondary → primary: a version kept aside here, handed to the primary
    /// (where conflicts are listed and restored); `Data` frames with
    /// `seq == id` carry its bytes. `kept_at` is when it was kept aside
    /// (unix seconds).
    ConflictFile {
        id: u64,
        store: u16,
        path: Vec<u8>,
        meta: Meta,
        size: u64,
        hash: u128,
        kept_at: i64,
    },
    /// Primary → secondary: conflict `id` is durable on the primary.
    ConflictAck {
        id: u64,
    },
    /// Primary → secondary: conflict `id` could not be kept (the primary's
    /// disk full or failing), and why: the secondary keeps its copy, says
    /// so in its status, and hands it over again after its wait.
    ConflictRefused {
        id: u64,
        why: String,
    },
    /// Primary → secondary: a folder's mtime after the changes of the batch
    /// it closes (entries landing there move it on the replica): applied
    /// once those entries have landed, not at once.
    DirMeta {
        seq: u64,
        store: u16,
        path: Vec<u8>,
        meta: Meta,
    },
}

/// One file of a queued message (Exim: `-H` and `-D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePart {
    pub suffix: String,
    pub meta: Meta,
    pub size: u64,
    pub hash: u128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOutcome {
    Ingested = 1,
    Duplicate = 2,
    Refused = 3,
}

/// Most parts in one queued message.
pub const QUEUE_PARTS_MAX: usize = 4;
/// Largest queued message part accepted.
pub const QUEUE_PART_BYTES_MAX: u64 = 1 << 30;

mod tag {
    pub const START: u8 = 1;
    pub const MANIFEST_REQUEST: u8 = 2;
    pub const FILE: u8 = 3;
    pub const FILE_APART: u8 = 17;
    pub const DATA: u8 = 4;
    pub const MKDIR: u8 = 5;
    pub const DELETE: u8 = 6;
    pub const DELETE_UNSURE: u8 = 16;
    pub const RENAME: u8 = 7;
    pub const LINK: u8 = 8;
    pub const SYMLINK: u8 = 9;
    pub const BARRIER: u8 = 10;
    pub const CAUGHT_UP: u8 = 11;
    pub const MANIFEST: u8 = 20;
    pub const ACK: u8 = 21;
    pub const NEED: u8 = 22;
    pub const REFUSED: u8 = 23;
    pub const QUEUE_START: u8 = 30;
    pub const QUEUE_MSG: u8 = 31;
    pub const QUEUE_ACK: u8 = 32;
    pub const QUEUE_END: u8 = 33;
    pub const QUEUE_END_ACK: u8 = 34;
    pub const KEEP_ASIDE: u8 = 12;
    pub const CONFLICT_ACK: u8 = 13;
    pub const CONFLICT_REFUSED: u8 = 15;
    pub const DIR_META: u8 = 14;
    pub const PEER_STATE: u8 = 24;
    pub const CONFLICT_FILE: u8 = 25;
    pub const FENCED: u8 = 26;
}

fn put_meta(w: &mut Writer, m: &Meta) {
    w.u32(m.mode)
        .u32(m.uid)
        .u32(m.gid)
        .i64(m.mtime_sec)
        .u32(m.mtime_nsec);
}

fn get_meta(r: &mut Reader<'_>) -> Result<Meta, WireError> {
    let meta = Meta {
        mode: r.u32("meta.mode")?,
        uid: r.u32("meta.uid")?,
        gid: r.u32("meta.gid")?,
        mtime_sec: r.i64("meta.mtime_sec")?,
        mtime_nsec: r.u32("meta.mtime_nsec")?,
    };
    if meta.mtime_nsec >= 1_000_000_000 {
        return Err(WireError::BadField {
            field: "meta.mtime_nsec",
            problem: format!("{} is not below 10^9", meta.mtime_nsec),
        });
    }
    if meta.mode & !0o7777 != 0 {
        return Err(WireError::BadField {
            field: "meta.mode",
            problem: format!("{:o} has bits outside 0o7777", meta.mode),
        });
    }
    Ok(meta)
}

fn path(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, WireError> {
    Ok(r.blob16(what, PATH_BYTES_MAX)?.to_vec())
}

fn text(r: &mut Reader<'_>, what: &'static str) -> Result<String, WireError> {
    let raw = r.blob16(what, TEXT_BYTES_MAX)?;
    String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadField {
        field: what,
        problem: "not UTF-8".into(),
    })
}

impl SyncMsg {
    /// Appends this message as one `Kind::Sync` frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new();
        match self {
            SyncMsg::Start { stores, epoch } => {
                w.u8(tag::START).u64(*epoch).u16(stores.len() as u16);
                for s in stores {
                    w.short_str(s);
                }
            }
            SyncMsg::Fenced { seen } => {
                w.u8(tag::FENCED).u64(*seen);
            }
            SyncMsg::ManifestRequest { id, full_verify } => {
                w.u8(tag::MANIFEST_REQUEST)
                    .u64(*id)
                    .u8(u8::from(*full_verify));
            }
            SyncMsg::File {
                seq,
                store,
                path,
                meta,
                size,
                hash,
                apart,
            } => {
                let t = if *apart { tag::FILE_APART } else { tag::FILE };
                w.u8(t).u64(*seq).u16(*store).blob16(path);
                put_meta(&mut w, meta);
                w.u64(*size).u128(*hash);
            }
            SyncMsg::Data { seq, bytes } => {
                w.u8(tag::DATA).u64(*seq).blob32(bytes);
            }
            SyncMsg::Mkdir {
                seq,
                store,
                path,
                meta,
            } => {
                w.u8(tag::MKDIR).u64(*seq).u16(*store).blob16(path);
                put_meta(&mut w, meta);
            }
            SyncMsg::Delete {
                seq,
                store,
                path,
                unsure,
            } => {
                let t = if *unsure {
                    tag::DELETE_UNSURE
                } else {
                    tag::DELETE
                };
                w.u8(t).u64(*seq).u16(*store).blob16(path);
            }
            SyncMsg::Rename {
                seq,
                store,
                from,
                to,
            } => {
                w.u8(tag::RENAME)
                    .u64(*seq)
                    .u16(*store)
                    .blob16(from)
                    .blob16(to);
            }
            SyncMsg::Link {
                seq,
                store,
                existing,
                path,
                hash,
                meta,
            } => {
                w.u8(tag::LINK)
                    .u64(*seq)
                    .u16(*store)
                    .blob16(existing)
                    .blob16(path)
                    .u128(*hash);
                put_meta(&mut w, meta);
            }
            SyncMsg::Symlink {
                seq,
                store,
                path,
                target,
                meta,
            } => {
                w.u8(tag::SYMLINK)
                    .u64(*seq)
                    .u16(*store)
                    .blob16(path)
                    .blob16(target);
                put_meta(&mut w, meta);
            }
            SyncMsg::Barrier { seq } => {
                w.u8(tag::BARRIER).u64(*seq);
            }
            SyncMsg::CaughtUp => {
                w.u8(tag::CAUGHT_UP);
            }
            SyncMsg::Manifest {
                id,
                store,
                entries,
                last,
            } => {
                w.u8(tag::MANIFEST)
                    .u64(*id)
                    .u16(*store)
                    .u8(u8::from(*last))
                    .u32(entries.len() as u32);
                for e in entries {
                    w.blob16(&e.path).u8(e.kind as u8).u64(e.size);
                    put_meta(&mut w, &e.meta);
                    w.u128(e.hash).u64(e.link);
                }
            }
            SyncMsg::Ack { seq } => {
                w.u8(tag::ACK).u64(*seq);
            }
            SyncMsg::Need {
                seq,
                store,
                path,
                reason,
            } => {
                w.u8(tag::NEED)
                    .u64(*seq)
                    .u16(*store)
                    .blob16(path)
                    .u8(*reason as u8);
            }
            SyncMsg::Refused {
                seq,
                store,
                path,
                why,
            } => {
                let why = cut_at_char_boundary(why, TEXT_BYTES_MAX).as_bytes();
                w.u8(tag::REFUSED)
                    .u64(*seq)
                    .u16(*store)
                    .blob16(path)
                    .blob16(why);
            }
            SyncMsg::QueueStart { layout, epoch } => {
                w.u8(tag::QUEUE_START).u8(*layout).u64(*epoch);
            }
            SyncMsg::QueueMsg {
                id,
                sub_queue,
                queue_id,
                key,
                parts,
            } => {
                w.u8(tag::QUEUE_MSG)
                    .u64(*id)
                    .short_str(sub_queue)
                    .short_str(queue_id)
                    .u128(*key)
                    .u8(parts.len() as u8);
                for p in parts {
                    w.short_str(&p.suffix);
                    put_meta(&mut w, &p.meta);
                    w.u64(p.size).u128(p.hash);
                }
            }
            SyncMsg::QueueAck {
                id,
                outcome,
                detail,
            } => {
                let d = cut_at_char_boundary(detail, TEXT_BYTES_MAX).as_bytes();
                w.u8(tag::QUEUE_ACK).u64(*id).u8(*outcome as u8).blob16(d);
            }
            SyncMsg::QueueEnd => {
                w.u8(tag::QUEUE_END);
            }
            SyncMsg::QueueEndAck { hook_ok } => {
                w.u8(tag::QUEUE_END_ACK).u8(u8::from(*hook_ok));
            }
            SyncMsg::PeerState {
                former_primary,
                served_epoch,
            } => {
                w.u8(tag::PEER_STATE)
                    .u8(u8::from(*former_primary))
                    .u64(served_epoch.unwrap_or(0));
            }
            SyncMsg::KeepAside { seq, store, path } => {
                w.u8(tag::KEEP_ASIDE).u64(*seq).u16(*store).blob16(path);
            }
            SyncMsg::ConflictFile {
                id,
                store,
                path,
                meta,
                size,
                hash,
                kept_at,
            } => {
                w.u8(tag::CONFLICT_FILE).u64(*id).u16(*store).blob16(path);
                put_meta(&mut w, meta);
                w.u64(*size).u128(*hash).i64(*kept_at);
            }
            SyncMsg::ConflictAck { id } => {
                w.u8(tag::CONFLICT_ACK).u64(*id);
            }
            SyncMsg::ConflictRefused { id, why } => {
                let why = cut_at_char_boundary(why, TEXT_BYTES_MAX).as_bytes();
                w.u8(tag::CONFLICT_REFUSED).u64(*id).blob16(why);
            }
            SyncMsg::DirMeta {
                seq,
                store,
                path,
                meta,
            } => {
                w.u8(tag::DIR_META).u64(*seq).u16(*store).blob16(path);
                put_meta(&mut w, meta);
            }
        }
        encode_frame(Kind::Sync, &w.finish(), out);
    }

    /// A `Data` frame's seq and where its bytes are in the frame's payload
    /// (the receiver writes them from the frame, without a copy); `None`
    /// for any other message. The same checks as [`SyncMsg::decode`].
    pub fn data_view(frame: &Frame) -> Option<Result<(u64, std::ops::Range<usize>), WireError>> {
        if frame.kind != Kind::Sync || frame.payload.first() != Some(&tag::DATA) {
            return None;
        }
        let mut r = Reader::new(frame.kind, &frame.payload[1..]);
        Some((|| {
            let seq = r.u64("data.seq")?;
            let len = r.blob32("data.bytes", DATA_BYTES_MAX)?.len();
            r.finish()?;
            let end = frame.payload.len();
            Ok((seq, end - len..end))
        })())
    }

    pub fn decode(frame: &Frame) -> Result<SyncMsg, WireError> {
        if frame.kind != Kind::Sync {
            return Err(WireError::Unexpected {
                expected: Kind::Sync,
                got: frame.kind,
            });
        }
        let mut r = Reader::new(frame.kind, &frame.payload);
        let t = r.u8("sync.tag")?;
        let msg = match t {
            tag::START => {
                let epoch = r.u64("start.epoch")?;
                let n = r.u16("start.count")? as usize;
                if n > STORES_MAX {
                    return Err(WireError::BadField {
                        field: "start.count",
                        problem: format!("{n} stores, limit {STORES_MAX}"),
                    });
                }
                let mut stores = Vec::with_capacity(n);
                for _ in 0..n {
                    stores.push(r.short_str("start.store")?);
                }
                SyncMsg::Start { stores, epoch }
            }
            tag::FENCED => SyncMsg::Fenced {
                seen: r.u64("fenced.seen")?,
            },
            tag::MANIFEST_REQUEST => SyncMsg::ManifestRequest {
                id: r.u64("manifest_request.id")?,
                full_verify: r.u8("manifest_request.full")? != 0,
            },
            tag::FILE | tag::FILE_APART => SyncMsg::File {
                seq: r.u64("file.seq")?,
                store: r.u16("file.store")?,
                path: path(&mut r, "file.path")?,
                meta: get_meta(&mut r)?,
                size: r.u64("file.size")?,
                hash: r.u128("file.hash")?,
                apart: t == tag::FILE_APART,
            },
            tag::DATA => SyncMsg::Data {
                seq: r.u64("data.seq")?,
                bytes: r.blob32("data.bytes", DATA_BYTES_MAX)?.to_vec(),
            },
            tag::MKDIR => SyncMsg::Mkdir {
                seq: r.u64("mkdir.seq")?,
                store: r.u16("mkdir.store")?,
                path: path(&mut r, "mkdir.path")?,
                meta: get_meta(&mut r)?,
            },
            tag::DELETE | tag::DELETE_UNSURE => SyncMsg::Delete {
                seq: r.u64("delete.seq")?,
                store: r.u16("delete.store")?,
                path: path(&mut r, "delete.path")?,
                unsure: t == tag::DELETE_UNSURE,
            },
            tag::RENAME => SyncMsg::Rename {
                seq: r.u64("rename.seq")?,
                store: r.u16("rename.store")?,
                from: path(&mut r, "rename.from")?,
                to: path(&mut r, "rename.to")?,
            },
            tag::LINK => SyncMsg::Link {
                seq: r.u64("link.seq")?,
                store: r.u16("link.store")?,
                existing: path(&mut r, "link.existing")?,
                path: path(&mut r, "link.path")?,
                hash: r.u128("link.hash")?,
                meta: get_meta(&mut r)?,
            },
            tag::SYMLINK => SyncMsg::Symlink {
                seq: r.u64("symlink.seq")?,
                store: r.u16("symlink.store")?,
                path: path(&mut r, "symlink.path")?,
                target: path(&mut r, "symlink.target")?,
                meta: get_meta(&mut r)?,
            },
            tag::BARRIER => SyncMsg::Barrier {
                seq: r.u64("barrier.seq")?,
            },
            tag::CAUGHT_UP => SyncMsg::CaughtUp,
            tag::MANIFEST => {
                let id = r.u64("manifest.id")?;
                let store = r.u16("manifest.store")?;
                let last = r.u8("manifest.last")? != 0;
                let n = r.u32("manifest.count")? as usize;
                if n > MANIFEST_ENTRIES_MAX {
                    return Err(WireError::BadField {
                        field: "manifest.count",
                        problem: format!("{n} entries, limit {MANIFEST_ENTRIES_MAX}"),
                    });
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let p = path(&mut r, "manifest.path")?;
                    let kind = match r.u8("manifest.kind")? {
                        1 => EntryKind::File,
                        2 => EntryKind::Dir,
                        3 => EntryKind::Symlink,
                        k => {
                            return Err(WireError::BadField {
                                field: "manifest.kind",
                                problem: format!("unknown entry kind {k}"),
                            })
                        }
                    };
                    entries.push(ManifestEntry {
                        path: p,
                        kind,
                        size: r.u64("manifest.size")?,
                        meta: get_meta(&mut r)?,
                        hash: r.u128("manifest.hash")?,
                        link: r.u64("manifest.link")?,
                    });
                }
                SyncMsg::Manifest {
                    id,
                    store,
                    entries,
                    last,
                }
            }
            tag::ACK => SyncMsg::Ack {
                seq: r.u64("ack.seq")?,
            },
            tag::NEED => {
                let seq = r.u64("need.seq")?;
                let store = r.u16("need.store")?;
                let p = path(&mut r, "need.path")?;
                let reason = match r.u8("need.reason")? {
                    1 => NeedReason::HashMismatch,
                    2 => NeedReason::SourceMissing,
                    3 => NeedReason::NoSpace,
                    4 => NeedReason::LocalError,
                    5 => NeedReason::MayHaveMoved,
                    k => {
                        return Err(WireError::BadField {
                            field: "need.reason",
                            problem: format!("unknown reason {k}"),
                        })
                    }
                };
                SyncMsg::Need {
                    seq,
                    store,
                    path: p,
                    reason,
                }
            }
            tag::REFUSED => SyncMsg::Refused {
                seq: r.u64("refused.seq")?,
                store: r.u16("refused.store")?,
                path: path(&mut r, "refused.path")?,
                why: text(&mut r, "refused.why")?,
            },
            tag::QUEUE_START => SyncMsg::QueueStart {
                layout: r.u8("queue_start.layout")?,
                epoch: r.u64("queue_start.epoch")?,
            },
            tag::QUEUE_MSG => {
                let id = r.u64("queue_msg.id")?;
                let sub_queue = r.short_str("queue_msg.sub_queue")?;
                let queue_id = r.short_str("queue_msg.queue_id")?;
                let key = r.u128("queue_msg.key")?;
                let n = r.u8("queue_msg.parts")? as usize;
                if n == 0 || n > QUEUE_PARTS_MAX {
                    return Err(WireError::BadField {
                        field: "queue_msg.parts",
                        problem: format!("{n} parts, expected 1..={QUEUE_PARTS_MAX}"),
                    });
                }
                let mut parts = Vec::with_capacity(n);
                for _ in 0..n {
                    let suffix = r.short_str("queue_part.suffix")?;
                    let meta = get_meta(&mut r)?;
                    let size = r.u64("queue_part.size")?;
                    if size > QUEUE_PART_BYTES_MAX {
                        return Err(WireError::BadField {
                            field: "queue_part.size",
                            problem: format!("{size} bytes, limit {QUEUE_PART_BYTES_MAX}"),
                        });
                    }
                    parts.push(QueuePart {
                        suffix,
                        meta,
                        size,
                        hash: r.u128("queue_part.hash")?,
                    });
                }
                SyncMsg::QueueMsg {
                    id,
                    sub_queue,
                    queue_id,
                    key,
                    parts,
                }
            }
            tag::QUEUE_ACK => {
                let id = r.u64("queue_ack.id")?;
                let outcome = match r.u8("queue_ack.outcome")? {
                    1 => QueueOutcome::Ingested,
                    2 => QueueOutcome::Duplicate,
                    3 => QueueOutcome::Refused,
                    k => {
                        return Err(WireError::BadField {
                            field: "queue_ack.outcome",
                            problem: format!("unknown outcome {k}"),
                        })
                    }
                };
                SyncMsg::QueueAck {
                    id,
                    outcome,
                    detail: text(&mut r, "queue_ack.detail")?,
                }
            }
            tag::QUEUE_END => SyncMsg::QueueEnd,
            tag::QUEUE_END_ACK => SyncMsg::QueueEndAck {
                hook_ok: r.u8("queue_end_ack.hook_ok")? != 0,
            },
            tag::PEER_STATE => SyncMsg::PeerState {
                former_primary: r.u8("peer_state.former_primary")? != 0,
                // Epochs start at 1.
                served_epoch: Some(r.u64("peer_state.served_epoch")?).filter(|&e| e != 0),
            },
            tag::KEEP_ASIDE => SyncMsg::KeepAside {
                seq: r.u64("keep_aside.seq")?,
                store: r.u16("keep_aside.store")?,
                path: path(&mut r, "keep_aside.path")?,
            },
            tag::CONFLICT_FILE => SyncMsg::ConflictFile {
                id: r.u64("conflict_file.id")?,
                store: r.u16("conflict_file.store")?,
                path: path(&mut r, "conflict_file.path")?,
                meta: get_meta(&mut r)?,
                size: r.u64("conflict_file.size")?,
                hash: r.u128("conflict_file.hash")?,
                kept_at: r.i64("conflict_file.kept_at")?,
            },
            tag::CONFLICT_ACK => SyncMsg::ConflictAck {
                id: r.u64("conflict_ack.id")?,
            },
            tag::CONFLICT_REFUSED => SyncMsg::ConflictRefused {
                id: r.u64("conflict_refused.id")?,
                why: text(&mut r, "conflict_refused.why")?,
            },
            tag::DIR_META => SyncMsg::DirMeta {
                seq: r.u64("dir_meta.seq")?,
                store: r.u16("dir_meta.store")?,
                path: path(&mut r, "dir_meta.path")?,
                meta: get_meta(&mut r)?,
            },
            other => {
                return Err(WireError::BadField {
                    field: "sync.tag",
                    problem: format!("unknown sync message {other}"),
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, Frame, Kind};

    fn round(m: SyncMsg) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let (f, used) = decode_frame(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(SyncMsg::decode(&f).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        let meta = Meta {
            mode: 0o4751,
            uid: 1,
            gid: 2,
            mtime_sec: -5,
            mtime_nsec: 999_999_999,
        };
        round(SyncMsg::Start {
            stores: vec!["inbox".into(), "archive".into()],
            epoch: 7,
        });
        round(SyncMsg::Fenced { seen: u64::MAX });
        round(SyncMsg::ManifestRequest {
            id: 3,
            full_verify: true,
        });
        round(SyncMsg::File {
            seq: 1,
            store: 2,
            path: b"a/cur/x:2,S".to_vec(),
            meta,
            size: 10,
            hash: u128::MAX - 7,
            apart: false,
        });
        round(SyncMsg::File {
            seq: 2,
            store: 0,
            path: b"a/cur/y".to_vec(),
            meta,
            size: 0,
            hash: 1,
            apart: true,
        });
        let mut f = Vec::new();
        SyncMsg::Data {
            seq: 9,
            bytes: b"content".to_vec(),
        }
        .encode(&mut f);
        let (frame, _) = crate::wire::decode_frame(&f).unwrap().unwrap();
        let (seq, range) = SyncMsg::data_view(&frame).unwrap().unwrap();
        assert_eq!((seq, &frame.payload[range]), (9, &b"content"[..]));
        let mut bad = frame.clone();
        bad.payload.push(0);
        assert!(SyncMsg::data_view(&bad).unwrap().is_err(), "trailing bytes");
        let mut f = Vec::new();
        SyncMsg::Barrier { seq: 1 }.encode(&mut f);
        let (frame, _) = crate::wire::decode_frame(&f).unwrap().unwrap();
        assert!(SyncMsg::data_view(&frame).is_none());
        round(SyncMsg::Data {
            seq: 1,
            bytes: vec![7; 1000],
        });
        round(SyncMsg::Mkdir {
            seq: 2,
            store: 0,
            path: b"d".to_vec(),
            meta,
        });
        round(SyncMsg::Delete {
            seq: 3,
            store: 0,
            path: b"d/x".to_vec(),
            unsure: false,
        });
        round(SyncMsg::Delete {
            seq: 3,
            store: 0,
            path: b"d/x".to_vec(),
            unsure: true,
        });
        round(SyncMsg::Rename {
            seq: 4,
            store: 0,
            from: b"new/x".to_vec(),
            to: b"cur/x:2,S".to_vec(),
        });
        round(SyncMsg::Link {
            seq: 5,
            store: 0,
            existing: b"a".to_vec(),
            path: b"b".to_vec(),
            hash: 7,
            meta: Meta {
                mode: 0o600,
                uid: 1,
                gid: 2,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 5,
            },
        });
        round(SyncMsg::Symlink {
            seq: 6,
            store: 0,
            path: b"l".to_vec(),
            target: b"../t".to_vec(),
            meta,
        });
        round(SyncMsg::Barrier { seq: 6 });
        round(SyncMsg::CaughtUp);
        round(SyncMsg::Manifest {
            id: 3,
            store: 1,
            entries: vec![ManifestEntry {
                path: b"x".to_vec(),
                kind: EntryKind::File,
                size: 1,
                meta,
                hash: 5,
                link: 77,
            }],
            last: true,
        });
        round(SyncMsg::Ack { seq: 6 });
        round(SyncMsg::QueueStart {
            layout: 2,
            epoch: 3,
        });
        round(SyncMsg::QueueMsg {
            id: 1,
            sub_queue: "deferred".into(),
            queue_id: "ABC123DEF".into(),
            key: 99,
            parts: vec![QueuePart {
                suffix: String::new(),
                meta,
                size: 10,
                hash: 5,
            }],
        });
        round(SyncMsg::QueueAck {
            id: 1,
            outcome: QueueOutcome::Duplicate,
            detail: "seen".into(),
        });
        round(SyncMsg::QueueEnd);
        round(SyncMsg::QueueEndAck { hook_ok: true });
        round(SyncMsg::Need {
            seq: 12,
            store: 0,
            path: b"x".to_vec(),
            reason: NeedReason::NoSpace,
        });
        round(SyncMsg::Refused {
            seq: 9,
            store: 0,
            path: b"../etc".to_vec(),
            why: "traversal".into(),
        });
        round(SyncMsg::ConflictRefused {
            id: 4,
            why: "No space left on device (os error 28)".into(),
        });
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..=16),
                proptest::collection::vec(any::<u8>(), max..=max),
                proptest::collection::vec(any::<u8>(), 0..=max),
            ]
        }

        fn path() -> impl Strategy<Value = Vec<u8>> {
            bytes(PATH_BYTES_MAX)
        }

        /// Any text, often longer than the limit and full of multibyte
        /// characters (the encoder must cut it where the decoder can read it).
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                "[\\u{80}-\\u{10ffff}]{300,700}",
                "(a|\\u{e9}|\\u{20ac}|\\u{1f600}){1000,1100}",
            ]
        }

        /// A name within its 255-byte limit, multibyte characters included.
        fn short() -> impl Strategy<Value = String> {
            ".{0,90}".prop_map(|s| cut_at_char_boundary(&s, 255).to_string())
        }

        fn meta() -> impl Strategy<Value = Meta> {
            (
                0u32..=0o7777,
                any::<u32>(),
                any::<u32>(),
                any::<i64>(),
                0u32..1_000_000_000,
            )
                .prop_map(|(mode, uid, gid, mtime_sec, mtime_nsec)| Meta {
                    mode,
                    uid,
                    gid,
                    mtime_sec,
                    mtime_nsec,
                })
        }

        fn entry() -> impl Strategy<Value = ManifestEntry> {
            (
                path(),
                1u8..=3,
                any::<u64>(),
                meta(),
                any::<u128>(),
                any::<u64>(),
            )
                .prop_map(|(path, k, size, meta, hash, link)| ManifestEntry {
                    path,
                    kind: match k {
                        1 => EntryKind::File,
                        2 => EntryKind::Dir,
                        _ => EntryKind::Symlink,
                    },
                    size,
                    meta,
                    hash,
                    link,
                })
        }

        fn part() -> impl Strategy<Value = QueuePart> {
            (short(), meta(), 0..=QUEUE_PART_BYTES_MAX, any::<u128>()).prop_map(
                |(suffix, meta, size, hash)| QueuePart {
                    suffix,
                    meta,
                    size,
                    hash,
                },
            )
        }

        fn msg() -> impl Strategy<Value = SyncMsg> {
            let (seq, store) = (any::<u64>(), any::<u16>());
            prop_oneof![
                (
                    proptest::collection::vec(short(), 0..=STORES_MAX),
                    any::<u64>()
                )
                    .prop_map(|(stores, epoch)| SyncMsg::Start { stores, epoch }),
                any::<u64>().prop_map(|seen| SyncMsg::Fenced { seen }),
                (any::<u64>(), any::<bool>())
                    .prop_map(|(id, full_verify)| SyncMsg::ManifestRequest { id, full_verify }),
                (
                    (seq, store, path(), meta()),
                    (any::<u64>(), any::<u128>(), any::<bool>())
                )
                    .prop_map(|((seq, store, path, meta), (size, hash, apart))| {
                        SyncMsg::File {
                            seq,
                            store,
                            path,
                            meta,
                            size,
                            hash,
                            apart,
                        }
                    }),
                (seq, bytes(DATA_BYTES_MAX)).prop_map(|(seq, bytes)| SyncMsg::Data { seq, bytes }),
                (seq, store, path(), meta()).prop_map(|(seq, store, path, meta)| SyncMsg::Mkdir {
                    seq,
                    store,
                    path,
                    meta
                }),
                (seq, store, path(), any::<bool>()).prop_map(|(seq, store, path, unsure)| {
                    SyncMsg::Delete {
                        seq,
                        store,
                        path,
                        unsure,
                    }
                }),
                (seq, store, path(), path()).prop_map(|(seq, store, from, to)| {
                    SyncMsg::Rename {
                        seq,
                        store,
                        from,
                        to,
                    }
                }),
                (seq, store, path(), path(), any::<u128>(), meta()).prop_map(
                    |(seq, store, existing, path, hash, meta)| SyncMsg::Link {
                        seq,
                        store,
                        existing,
                        path,
                        hash,
                        meta,
                    }
                ),
                (seq, store, path(), path(), meta()).prop_map(
                    |(seq, store, path, target, meta)| SyncMsg::Symlink {
                        seq,
                        store,
                        path,
                        target,
                        meta
                    }
                ),
                seq.prop_map(|seq| SyncMsg::Barrier { seq }),
                Just(SyncMsg::CaughtUp),
                (
                    any::<u64>(),
                    store,
                    proptest::collection::vec(entry(), 0..4),
                    any::<bool>()
                )
                    .prop_map(|(id, store, entries, last)| SyncMsg::Manifest {
                        id,
                        store,
                        entries,
                        last
                    }),
                seq.prop_map(|seq| SyncMsg::Ack { seq }),
                (seq, store, path(), 1u8..=5).prop_map(|(seq, store, path, r)| {
                    SyncMsg::Need {
                        seq,
                        store,
                        path,
                        reason: match r {
                            1 => NeedReason::HashMismatch,
                            2 => NeedReason::SourceMissing,
                            3 => NeedReason::NoSpace,
                            4 => NeedReason::LocalError,
                            _ => NeedReason::MayHaveMoved,
                        },
                    }
                }),
                (seq, store, path(), text()).prop_map(|(seq, store, path, why)| {
                    SyncMsg::Refused {
                        seq,
                        store,
                        path,
                        why,
                    }
                }),
                (any::<u8>(), any::<u64>())
                    .prop_map(|(layout, epoch)| SyncMsg::QueueStart { layout, epoch }),
                (
                    any::<u64>(),
                    short(),
                    short(),
                    any::<u128>(),
                    proptest::collection::vec(part(), 1..=QUEUE_PARTS_MAX)
                )
                    .prop_map(|(id, sub_queue, queue_id, key, parts)| {
                        SyncMsg::QueueMsg {
                            id,
                            sub_queue,
                            queue_id,
                            key,
                            parts,
                        }
                    }),
                (any::<u64>(), 1u8..=3, text()).prop_map(|(id, o, detail)| SyncMsg::QueueAck {
                    id,
                    outcome: match o {
                        1 => QueueOutcome::Ingested,
                        2 => QueueOutcome::Duplicate,
                        _ => QueueOutcome::Refused,
                    },
                    detail
                }),
                Just(SyncMsg::QueueEnd),
                any::<bool>().prop_map(|hook_ok| SyncMsg::QueueEndAck { hook_ok }),
                (any::<bool>(), proptest::option::of(1u64..)).prop_map(
                    |(former_primary, served_epoch)| SyncMsg::PeerState {
                        former_primary,
                        served_epoch
                    }
                ),
                (seq, store, path()).prop_map(|(seq, store, path)| SyncMsg::KeepAside {
                    seq,
                    store,
                    path
                }),
                (
                    any::<u64>(),
                    store,
                    path(),
                    meta(),
                    any::<u64>(),
                    any::<u128>(),
                    any::<i64>()
                )
                    .prop_map(|(id, store, path, meta, size, hash, kept_at)| {
                        SyncMsg::ConflictFile {
                            id,
                            store,
                            path,
                            meta,
                            size,
                            hash,
                            kept_at,
                        }
                    }),
                any::<u64>().prop_map(|id| SyncMsg::ConflictAck { id }),
                (any::<u64>(), text()).prop_map(|(id, why)| SyncMsg::ConflictRefused { id, why }),
                (seq, store, path(), meta()).prop_map(|(seq, store, path, meta)| {
                    SyncMsg::DirMeta {
                        seq,
                        store,
                        path,
                        meta,
                    }
                }),
            ]
        }

        /// What the peer must decode: `m` with its free text cut to the
        /// limit at a character boundary, and nothing else changed.
        fn as_sent(m: &SyncMsg) -> SyncMsg {
            let mut m = m.clone();
            match &mut m {
                SyncMsg::Refused { why: t, .. }
                | SyncMsg::ConflictRefused { why: t, .. }
                | SyncMsg::QueueAck { detail: t, .. } => {
                    *t = cut_at_char_boundary(t, TEXT_BYTES_MAX).to_string();
                }
                _ => {}
            }
            m
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn every_message_decodes_to_what_was_encoded(m in msg()) {
                let mut out = Vec::new();
                m.encode(&mut out);
                let (f, used) = decode_frame(&out)
                    .expect("the encoder never produces a frame the decoder refuses")
                    .expect("one whole frame");
                prop_assert_eq!(used, out.len());
                let back = SyncMsg::decode(&f).expect("the encoder never produces a message the decoder refuses");
                prop_assert_eq!(&back, &as_sent(&m));
                if let SyncMsg::Refused { why: t, .. }
                | SyncMsg::ConflictRefused { why: t, .. }
                | SyncMsg::QueueAck { detail: t, .. } = &back
                {
                    prop_assert!(t.len() <= TEXT_BYTES_MAX);
                }
            }

            #[test]
            fn decoding_arbitrary_sync_payloads_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
                let _ = SyncMsg::decode(&Frame { kind: Kind::Sync, payload: payload.clone() });
                let _ = SyncMsg::data_view(&Frame { kind: Kind::Sync, payload });
            }
        }
    }

    #[test]
    fn a_reason_cut_inside_a_multibyte_character_still_decodes() {
        // 1,023 ASCII bytes then a 3-byte character: byte 1,024 is inside it.
        let why = format!("{}\u{20ac}tail", "x".repeat(TEXT_BYTES_MAX - 1));
        let mut out = Vec::new();
        SyncMsg::Refused {
            seq: 1,
            store: 0,
            path: b"p".to_vec(),
            why: why.clone(),
        }
        .encode(&mut out);
        let (f, _) = decode_frame(&out).unwrap().unwrap();
        match SyncMsg::decode(&f).unwrap() {
            SyncMsg::Refused { why: got, .. } => assert_eq!(got, "x".repeat(TEXT_BYTES_MAX - 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mode_bits_outside_permissions_are_refused() {
        let mut out = Vec::new();
        SyncMsg::Mkdir {
            seq: 2,
            store: 0,
            path: b"d".to_vec(),
            meta: Meta {
                mode: 0o170755,
                ..Meta::default()
            },
        }
        .encode(&mut out);
        let (f, _) = decode_frame(&out).unwrap().unwrap();
        assert!(matches!(
            SyncMsg::decode(&f),
            Err(WireError::BadField {
                field: "meta.mode",
                ..
            })
        ));
    }
}
