//! The heartbeat-link wire codec: pure, strict, no I/O.
//!
//! Every frame is
//! ```text
//! magic "HS" | version u8 | kind u8 | payload length u32 LE | payload | xxh3-64 LE of all before
//! ```
//! Lengths are checked against a per-kind cap before anything is allocated,
//! unknown versions and kinds are refused, a bad checksum is an error, and a
//! payload must be consumed exactly (trailing bytes are refused).
//!
//! One kind differs: a `Bulk` frame carries raw file content that the sender
//! splices from the page cache straight into the socket, bytes it never sees,
//! so its checksum covers only the header and comes before the payload:
//! ```text
//! magic "HS" | version u8 | kind 17 u8 | payload length u32 LE | xxh3-64 LE of the 8 bytes before | payload
//! ```
//! A `Bulk` payload is always part of a file announced with its size and
//! xxh3-128 (`sync::SyncMsg::File`), which the receiver checks before the file
//! lands; a corrupted payload is refused there and sent again.

mod codec;
mod messages;
pub mod sync;

pub use codec::{cut_at_char_boundary, Reader, Writer};
pub use messages::{Channel, Hello, Message, Proof, NONCE_LEN, PROOF_LEN};

use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: [u8; 2] = *b"HS";
/// Version 8: an unsure `Delete` (a name found gone, maybe moved) and
/// `Need` `MayHaveMoved`.
/// Version 7: `ConflictRefused` (a version handed over that the primary
/// cannot keep, and why).
/// Version 6: `PeerState` says the epoch a former primary last served at;
/// `Link` carries the inode's metadata.
/// Version 5: links carry the content hash. Version 4: epochs as fencing tokens (`Start.epoch`, `QueueStart.epoch`,
/// `Fenced`). Version 3: exact conflicts (`PeerState`, `KeepAside`, `ConflictFile`,
/// `ConflictAck`). Version 2 added `Bulk` frames and `Need` naming its op.
pub const VERSION: u8 = 10;
pub const HEADER_LEN: usize = 8;
pub const TRAILER_LEN: usize = 8;
/// Header of a `Bulk` frame: the common 8 bytes and their checksum.
pub const BULK_HEADER_LEN: usize = 16;
/// Largest payload of a `Bulk` frame.
pub const BULK_PAYLOAD_BYTES_MAX: u32 = 1 << 20;
/// Largest payload of any frame kind (bulk sync data).
pub const PAYLOAD_BYTES_MAX: u32 = 8 << 20;
/// Largest payload of a control frame (hello, proof, heartbeat).
pub const CONTROL_PAYLOAD_BYTES_MAX: u32 = 1024;
/// Largest payload read from a peer that has not authenticated yet: a
/// `Hello` (98 bytes at most) or a `Proof` (32).
pub const HANDSHAKE_PAYLOAD_BYTES_MAX: u32 = 128;

/// Which frames a connection accepts in its current state, checked on the
/// 8-byte header before the payload is read or buffered: a stranger's
/// connection can make the reader hold at most one handshake frame, and a
/// heartbeat connection never buffers bulk data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramePolicy {
    /// Before authentication: `Hello` and `Proof`, at most
    /// [`HANDSHAKE_PAYLOAD_BYTES_MAX`] bytes.
    Handshake,
    /// An authenticated heartbeat connection: control frames only.
    Control,
    /// An authenticated sync or queue connection: every kind, each within
    /// its own cap.
    Sync,
}

impl FramePolicy {
    /// The cap on `kind`'s payload under this policy; `None` if the kind is
    /// not accepted at all.
    pub fn cap(self, kind: Kind) -> Option<u32> {
        match (self, kind) {
            (FramePolicy::Handshake, Kind::Hello | Kind::Proof) => {
                Some(HANDSHAKE_PAYLOAD_BYTES_MAX)
            }
            (FramePolicy::Handshake, _) => None,
            (FramePolicy::Control, Kind::Hello | Kind::Proof | Kind::Heartbeat) => {
                Some(kind.max_payload())
            }
            (FramePolicy::Control, _) => None,
            (FramePolicy::Sync, k) => Some(k.max_payload()),
        }
    }
}

/// Frame kinds. The number is on the wire; never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Proof = 2,
    Heartbeat = 3,
    /// Mailstore replication (see [`sync`]).
    Sync = 16,
    /// Raw content of the file being sent on the sync connection.
    Bulk = 17,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Proof,
            3 => Kind::Heartbeat,
            16 => Kind::Sync,
            17 => Kind::Bulk,
            _ => return None,
        })
    }

    /// The cap on this kind's payload, checked before allocation.
    pub fn max_payload(self) -> u32 {
        match self {
            Kind::Hello | Kind::Proof | Kind::Heartbeat => CONTROL_PAYLOAD_BYTES_MAX,
            Kind::Sync => PAYLOAD_BYTES_MAX,
            Kind::Bulk => BULK_PAYLOAD_BYTES_MAX,
        }
    }
}

/// A malformed or incompatible frame. The peer is at fault for all of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a hasync link")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {got} (this node speaks {VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {max}")]
    TooLong { kind: Kind, len: u32, max: u32 },
    #[error(
        "checksum mismatch on {kind:?} frame (computed {computed:016x}, frame says {claimed:016x})"
    )]
    BadChecksum {
        kind: Kind,
        computed: u64,
        claimed: u64,
    },
    #[error("{what} truncated: needed {needed} more bytes")]
    Truncated { what: &'static str, needed: usize },
    #[error("{kind:?} payload has {extra} trailing bytes")]
    TrailingBytes { kind: Kind, extra: usize },
    #[error("field {field}: {problem}")]
    BadField {
        field: &'static str,
        problem: String,
    },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("{kind:?} frame not accepted {state}")]
    NotAccepted { kind: Kind, state: &'static str },
}

/// One decoded frame: its kind and its (checksum-verified) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Appends one frame to `out`.
pub fn encode_frame(kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    if kind == Kind::Bulk {
        out.extend_from_slice(&bulk_header(payload.len() as u32));
        out.extend_from_slice(payload);
        return;
    }
    assert!(
        payload.len() <= kind.max_payload() as usize,
        "{kind:?} payload of {} bytes exceeds its cap",
        payload.len()
    );
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = xxh3_64(&out[start..]);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// The header of a `Bulk` frame of `len` payload bytes; the payload follows.
pub fn bulk_header(len: u32) -> [u8; BULK_HEADER_LEN] {
    assert!(
        len <= BULK_PAYLOAD_BYTES_MAX,
        "bulk payload of {len} bytes exceeds its cap"
    );
    let mut h = [0u8; BULK_HEADER_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = Kind::Bulk as u8;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = xxh3_64(&h[..HEADER_LEN]);
    h[HEADER_LEN..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Decodes the first frame in `buf`. `Ok(None)` means "need more bytes";
/// `Ok(Some((frame, used)))` consumed `used` bytes. Errors are final for the
/// connection.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    decode_frame_under(buf, FramePolicy::Sync)
}

/// [`decode_frame`] for a connection in the state `policy` describes: a
/// kind the policy does not accept, or a length over its cap, is refused on
/// the header, before the payload arrives.
pub fn decode_frame_under(
    buf: &[u8],
    policy: FramePolicy,
) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        // Refuse garbage as early as the magic allows.
        if buf.len() >= 2 && buf[..2] != MAGIC {
            return Err(WireError::BadMagic([buf[0], buf[1]]));
        }
        return Ok(None);
    }
    let magic = [buf[0], buf[1]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[2] != VERSION {
        return Err(WireError::UnsupportedVersion { got: buf[2] });
    }
    let kind = Kind::from_u8(buf[3]).ok_or(WireError::UnknownKind(buf[3]))?;
    let Some(max) = policy.cap(kind) else {
        return Err(WireError::NotAccepted {
            kind,
            state: match policy {
                FramePolicy::Handshake => "before authentication",
                FramePolicy::Control => "on a heartbeat connection",
                FramePolicy::Sync => "on a sync connection",
            },
        });
    };
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > max {
        return Err(WireError::TooLong { kind, len, max });
    }
    if kind == Kind::Bulk {
        return decode_bulk(buf, len);
    }
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if buf.len() < total {
        return Ok(None);
    }
    let body_end = HEADER_LEN + len as usize;
    check_sum(kind, &buf[..body_end], &buf[body_end..total])?;
    Ok(Some((
        Frame {
            kind,
            payload: buf[HEADER_LEN..body_end].to_vec(),
        },
        total,
    )))
}

/// `covered`'s xxh3-64 must be the 8 little-endian bytes `sum`.
fn check_sum(kind: Kind, covered: &[u8], sum: &[u8]) -> Result<(), WireError> {
    let computed = xxh3_64(covered);
    let mut claimed_bytes = [0u8; 8];
    claimed_bytes.copy_from_slice(sum);
    let claimed = u64::from_le_bytes(claimed_bytes);
    if computed != claimed {
        return Err(WireError::BadChecksum {
            kind,
            computed,
            claimed,
        });
    }
    Ok(())
}

/// The rest of a `Bulk` frame whose common header (`len`) was checked.
fn decode_bulk(buf: &[u8], len: u32) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < BULK_HEADER_LEN {
        return Ok(None);
    }
    check_sum(
        Kind::Bulk,
        &buf[..HEADER_LEN],
        &buf[HEADER_LEN..BULK_HEADER_LEN],
    )?;
    let total = BULK_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            kind: Kind::Bulk,
            payload: buf[BULK_HEADER_LEN..total].to_vec(),
        },
        total,
    )))
}

#[cfg(test)]
mod tests;
