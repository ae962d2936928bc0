//! The messages carried in frames.

use super::codec::{Reader, Writer};
use super::{encode_frame, Frame, Kind, WireError};
use crate::failover::{Heartbeat, Role};

pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// Node names on the wire are bounded like in the configuration.
const NAME_BYTES_MAX: usize = 64;

/// Which job a connection does. Heartbeats get a connection of their own so
/// that they never queue behind bulk sync data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Heartbeat = 1,
    Sync = 2,
    /// Queue push from a former primary to the new primary.
    Queue = 3,
}

/// First frame on a connection, from both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub channel: Channel,
    pub node: String,
    pub nonce: [u8; NONCE_LEN],
}

/// Second frame: proof of knowing the link secret (see `link::auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub mac: [u8; PROOF_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Proof(Proof),
    Heartbeat(Heartbeat),
}

/// Node names as the configuration allows them: 1..=64 bytes of
/// `[A-Za-z0-9._-]` (so a peer's name can never carry a newline or a
/// terminal escape into a log line).
fn check_name(field: &'static str, name: String) -> Result<String, WireError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(WireError::BadField {
            field,
            problem: format!("length {} outside 1..={NAME_BYTES_MAX}", name.len()),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(WireError::BadField {
            field,
            problem: format!("character {c:?} is not allowed in a node name"),
        });
    }
    Ok(name)
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Proof(_) => Kind::Proof,
            Message::Heartbeat(_) => Kind::Heartbeat,
        }
    }

    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new();
        match self {
            Message::Hello(h) => {
                w.u8(h.channel as u8).short_str(&h.node).bytes(&h.nonce);
            }
            Message::Proof(p) => {
                w.bytes(&p.mac);
            }
            Message::Heartbeat(hb) => {
                w.u8(hb.role.code())
                    .u8(hb.priority)
                    .u8(hb.flags)
                    .u64(hb.epoch)
                    .u64(hb.seq)
                    .short_str(&hb.node);
            }
        }
        encode_frame(self.kind(), &w.finish(), out);
    }

    pub fn to_frame_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub fn decode(frame: &Frame) -> Result<Message, WireError> {
        let mut r = Reader::new(frame.kind, &frame.payload);
        let msg = match frame.kind {
            Kind::Sync | Kind::Bulk => {
                return Err(WireError::Unexpected {
                    expected: Kind::Heartbeat,
                    got: frame.kind,
                })
            }
            Kind::Hello => {
                let channel = match r.u8("hello.channel")? {
                    1 => Channel::Heartbeat,
                    2 => Channel::Sync,
                    3 => Channel::Queue,
                    other => {
                        return Err(WireError::BadField {
                            field: "hello.channel",
                            problem: format!("unknown channel {other}"),
                        })
                    }
                };
                let node = check_name("hello.node", r.short_str("hello.node")?)?;
                let nonce = r.array::<NONCE_LEN>("hello.nonce")?;
                Message::Hello(Hello {
                    channel,
                    node,
                    nonce,
                })
            }
            Kind::Proof => Message::Proof(Proof {
                mac: r.array::<PROOF_LEN>("proof.mac")?,
            }),
            Kind::Heartbeat => {
                let code = r.u8("heartbeat.role")?;
                let role = Role::from_code(code).ok_or_else(|| WireError::BadField {
                    field: "heartbeat.role",
                    problem: format!("unknown role code {code}"),
                })?;
                let priority = r.u8("heartbeat.priority")?;
                let flags = r.u8("heartbeat.flags")?;
                let epoch = r.u64("heartbeat.epoch")?;
                let seq = r.u64("heartbeat.seq")?;
                let node = check_name("heartbeat.node", r.short_str("heartbeat.node")?)?;
                Message::Heartbeat(Heartbeat {
                    node,
                    role,
                    epoch,
                    seq,
                    priority,
                    flags,
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}
