//! The heartbeat link: authenticated TCP connections to the peer, on tokio-uring.
//!
//! Topology: each node dials the peer and *sends* its heartbeats on the
//! connection it dialled, and *receives* the peer's heartbeats on the
//! connection it accepted. So there is never a duplicate connection to
//! arbitrate, and a one-way failure shows as lost heartbeats in that
//! direction only. Heartbeat connections carry nothing else (channel
//! `Heartbeat` in the hello), so they never queue behind bulk sync data.

pub mod auth;
pub mod gate;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::failover::Heartbeat;
use crate::wire::{
    decode_frame_under, Channel, Frame, FramePolicy, Hello, Message, Proof, WireError, NONCE_LEN,
};
use auth::{LinkKey, Side};

/// Authenticated inbound heartbeat connections kept at once; a newer one
/// replaces the oldest (the peer reconnected and the old one is dead).
const INBOUND_AUTHENTICATED_MAX: usize = 2;
/// Read buffer size per authenticated connection.
const READ_CHUNK: usize = 256 * 1024;
/// Read buffer of a connection that has not authenticated: room for the
/// largest handshake frame, so a stranger costs a few hundred bytes.
const HANDSHAKE_READ_CHUNK: usize = 512;
/// Reconnect backoff: first retry and ceiling.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Who was at fault when a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer {peer}: {op}: {source}")]
    Io {
        peer: SocketAddr,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("peer {peer} sent a malformed frame: {source}")]
    Wire { peer: SocketAddr, source: WireError },
    #[error("peer {peer} ({name:?}) failed authentication: it does not know the link secret")]
    AuthFailed { peer: SocketAddr, name: String },
    #[error("peer {peer} introduced itself as {got:?}, but the configured peer is {expected:?}")]
    UnexpectedPeer {
        peer: SocketAddr,
        got: String,
        expected: String,
    },
    #[error("peer {peer} sent {got} where {expected} was expected")]
    Protocol {
        peer: SocketAddr,
        expected: &'static str,
        got: String,
    },
    #[error("peer {peer}: {what} timed out after {after:?}")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    #[error("peer {peer} closed the connection")]
    Closed { peer: SocketAddr },
}

/// Counters and gauges of the link, read by `hasync status`.
#[derive(Debug)]
pub struct LinkStats {
    pub outbound_connected: Cell<bool>,
    pub inbound_connections: Cell<usize>,
    pub auth_failures: Cell<u64>,
    pub frame_errors: Cell<u64>,
    pub heartbeats_sent: Cell<u64>,
    pub heartbeats_received: Cell<u64>,
    pub last_received: Cell<Option<Instant>>,
    /// Gaps between consecutive received heartbeats, in microseconds.
    pub gaps_us: RefCell<Histogram<u64>>,
}

impl Default for LinkStats {
    fn default() -> Self {
        LinkStats {
            outbound_connected: Cell::new(false),
            inbound_connections: Cell::new(0),
            auth_failures: Cell::new(0),
            frame_errors: Cell::new(0),
            heartbeats_sent: Cell::new(0),
            heartbeats_received: Cell::new(0),
            last_received: Cell::new(None),
            gaps_us: RefCell::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds"),
            ),
        }
    }
}

/// What both link tasks need to know.
pub struct LinkCtx {
    pub node_name: String,
    pub peer_name: String,
    pub peer_addr: SocketAddr,
    pub key: LinkKey,
    /// Bound on handshakes and on silence before a connection is dropped.
    pub io_timeout: Duration,
    pub stats: LinkStats,
    /// Wakes the dialer out of its backoff: the peer just connected to us,
    /// so it is up (a restarted peer must hear us within its start-up
    /// wait, not after our backoff of up to 2 s).
    pub redial: tokio::sync::Notify,
}

impl std::fmt::Debug for LinkCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCtx")
            .field("node_name", &self.node_name)
            .field("peer_name", &self.peer_name)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

/// One framed connection. The stream is shared (`Rc`) so that a reader task
/// and a writer can use it at once; each half owns its own buffers.
pub struct Conn {
    stream: Rc<TcpStream>,
    peer: SocketAddr,
    reader: FrameReader,
}

/// The reading half: owns the read buffer.
///
/// Dropping it shuts the socket's read side down. tokio-uring keeps a read
/// that is in flight (and with it the descriptor) until it completes, so a
/// reader abandoned mid-read (a handshake timeout, an evicted stranger)
/// would otherwise hold its socket open for as long as the other end stays
/// silent.
pub struct FrameReader {
    stream: Rc<TcpStream>,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    /// Start of the undecoded bytes in `rbuf` (advancing a cursor instead of
    /// draining keeps decoding linear in the bytes received).
    start: usize,
    /// Which frames are accepted now: handshake frames until the peer has
    /// authenticated, then those of the connection's channel.
    policy: FramePolicy,
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Read);
    }
}

/// The writing half.
#[derive(Clone)]
pub struct FrameWriter {
    stream: Rc<TcpStream>,
    peer: SocketAddr,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Conn {
        // Heartbeats are tiny and latency-critical: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let stream = Rc::new(stream);
        Conn {
            reader: FrameReader {
                stream: stream.clone(),
                peer,
                rbuf: Vec::new(),
                start: 0,
                policy: FramePolicy::Handshake,
            },
            stream,
            peer,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A handle that can close this connection from elsewhere (an evicted
    /// stranger): shutting the socket down ends a read in flight.
    pub fn closer(&self) -> FrameWriter {
        self.writer()
    }

    /// After a successful handshake: accept the frames of `channel`.
    fn authenticated(&mut self, channel: Channel) {
        self.reader.policy = match channel {
            Channel::Heartbeat => FramePolicy::Control,
            Channel::Sync | Channel::Queue => FramePolicy::Sync,
        };
    }

    pub fn split(self) -> (FrameReader, FrameWriter) {
        let w = FrameWriter {
            stream: self.stream,
            peer: self.peer,
        };
        (self.reader, w)
    }

    pub async fn send(&self, msg: &Message) -> Result<(), LinkError> {
        self.writer().send_bytes(msg.to_frame_bytes()).await
    }

    fn writer(&self) -> FrameWriter {
        FrameWriter {
            stream: self.stream.clone(),
            peer: self.peer,
        }
    }

    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        self.reader.recv().await
    }

    async fn recv_within(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Message, LinkError> {
        self.reader.recv_within(limit, what).await
    }
}

impl std::os::fd::AsRawFd for FrameWriter {
    /// The socket, for a splice pump (`crate::io::splice`) that writes
    /// while this writer waits.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl FrameWriter {
    /// Writes already-encoded frames; the buffer is handed to the kernel and
    /// returned so that the caller can reuse its allocation.
    pub async fn send_buf(&self, bytes: Vec<u8>) -> (Result<(), LinkError>, Vec<u8>) {
        let (res, buf) = self.stream.write_all(bytes).await;
        (
            res.map_err(|source| LinkError::Io {
                peer: self.peer,
                op: "write",
                source,
            }),
            buf,
        )
    }

    pub async fn send_bytes(&self, bytes: Vec<u8>) -> Result<(), LinkError> {
        self.send_buf(bytes).await.0
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Closes both directions, so that the peer's reader ends at once.
    pub fn shutdown(&self) -> std::io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Both)
    }
}

impl FrameReader {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The next checksum-verified frame. Not cancel-safe: bytes already
    /// buffered are lost if the future is dropped, so a reader whose receive
    /// was cancelled (a timeout) must be dropped with its connection.
    pub async fn recv_frame(&mut self) -> Result<Frame, LinkError> {
        loop {
            let peer = self.peer;
            if let Some((frame, used)) = decode_frame_under(&self.rbuf[self.start..], self.policy)
                .map_err(|source| LinkError::Wire { peer, source })?
            {
                self.start += used;
                return Ok(frame);
            }
            // Only an incomplete frame is left: move it to the front, then
            // read straight into the buffer's free space (no copy).
            self.rbuf.drain(..self.start);
            self.start = 0;
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.reserve(if self.policy == FramePolicy::Handshake {
                HANDSHAKE_READ_CHUNK
            } else {
                READ_CHUNK
            });
            let len = buf.len();
            let cap = buf.capacity();
            let (res, slice) = self.stream.read(buf.slice(len..cap)).await;
            self.rbuf = slice.into_inner();
            let n = res.map_err(|source| LinkError::Io {
                peer,
                op: "read",
                source,
            })?;
            if n == 0 {
                return Err(LinkError::Closed { peer });
            }
        }
    }

    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        let frame = self.recv_frame().await?;
        Message::decode(&frame).map_err(|source| LinkError::Wire {
            peer: self.peer,
            source,
        })
    }

    pub async fn recv_within(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Message, LinkError> {
        let peer = self.peer;
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| LinkError::Timeout {
                peer,
                what,
                after: limit,
            })?
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        match rustix::rand::getrandom(&mut n[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(k) => filled += k,
            Err(rustix::io::Errno::INTR) => continue,
            // getrandom(2) cannot fail on Linux >= 3.17 once the pool is
            // initialised; a failure here means a broken kernel.
            Err(e) => panic!("getrandom failed: {e}"),
        }
    }
    n
}

/// Runs the mutual challenge-response. Nothing else is read from or sent to
/// the peer before it succeeds.
pub async fn handshake(
    conn: &mut Conn,
    ctx: &LinkCtx,
    side: Side,
    channel: Channel,
) -> Result<(), LinkError> {
    handshake_accepting(conn, ctx, side, channel, &[channel])
        .await
        .map(|_| ())
}

/// Like [`handshake`]; a responder accepts any channel in `allowed` and
/// returns the one the initiator asked for (the initiator chose it, so it
/// does not check the responder's).
pub async fn handshake_accepting(
    conn: &mut Conn,
    ctx: &LinkCtx,
    side: Side,
    channel: Channel,
    allowed: &[Channel],
) -> Result<Channel, LinkError> {
    let peer = conn.peer();
    let own_nonce = nonce();
    conn.send(&Message::Hello(Hello {
        channel,
        node: ctx.node_name.clone(),
        nonce: own_nonce,
    }))
    .await?;
    let hello = match conn.recv_within(ctx.io_timeout, "hello").await? {
        Message::Hello(h) => h,
        other => {
            return Err(LinkError::Protocol {
                peer,
                expected: "hello",
                got: format!("{:?}", other.kind()),
            })
        }
    };
    if hello.node != ctx.peer_name {
        return Err(LinkError::UnexpectedPeer {
            peer,
            got: hello.node,
            expected: ctx.peer_name.clone(),
        });
    }
    if side == Side::Responder && !allowed.contains(&hello.channel) {
        return Err(LinkError::Protocol {
            peer,
            expected: "a channel this port serves",
            got: format!("{:?}", hello.channel),
        });
    }
    let mac = ctx
        .key
        .proof(side, &ctx.node_name, &hello.node, &own_nonce, &hello.nonce);
    conn.send(&Message::Proof(Proof { mac })).await?;
    let proof = match conn.recv_within(ctx.io_timeout, "proof").await? {
        Message::Proof(p) => p,
        other => {
            return Err(LinkError::Protocol {
                peer,
                expected: "proof",
                got: format!("{:?}", other.kind()),
            })
        }
    };
    let peer_side = match side {
        Side::Initiator => Side::Responder,
        Side::Responder => Side::Initiator,
    };
    if !ctx.key.verify(
        peer_side,
        &hello.node,
        &ctx.node_name,
        &hello.nonce,
        &own_nonce,
        &proof.mac,
    ) {
        return Err(LinkError::AuthFailed {
            peer,
            name: hello.node,
        });
    }
    let channel = if side == Side::Responder {
        hello.channel
    } else {
        channel
    };
    conn.authenticated(channel);
    Ok(channel)
}

/// Admits an inbound connection through `gate` and runs the responder's
/// handshake within the gate's deadline. Returns the authenticated
/// connection and the channel it asked for; `None` when it was refused
/// (counted and, rate-limited, logged by the gate) — its socket is closed
/// by then.
pub async fn accept_authenticated(
    gate: &gate::Gate,
    ctx: &LinkCtx,
    stream: TcpStream,
    addr: SocketAddr,
    allowed: &[Channel],
) -> Option<(Conn, Channel)> {
    let mut conn = Conn::new(stream, addr);
    let ticket = gate.admit(addr, conn.closer());
    let res = tokio::time::timeout(
        gate.handshake_timeout(),
        handshake_accepting(&mut conn, ctx, Side::Responder, allowed[0], allowed),
    )
    .await;
    let evicted = gate.was_evicted(&ticket);
    drop(ticket);
    let now = Instant::now();
    match res {
        Ok(Ok(channel)) => {
            gate.authenticated();
            Some((conn, channel))
        }
        Ok(Err(e)) => {
            use gate::Refusal;
            let why = match &e {
                _ if evicted => Refusal::Evicted,
                LinkError::AuthFailed { .. } | LinkError::UnexpectedPeer { .. } => {
                    Refusal::AuthFailed
                }
                LinkError::Wire { .. } | LinkError::Protocol { .. } => Refusal::BadFrames,
                LinkError::Timeout { .. } => Refusal::Timeout,
                LinkError::Io { .. } | LinkError::Closed { .. } => Refusal::Closed,
            };
            gate.refused(now, addr, why, &e.to_string());
            None
        }
        Err(_) => {
            // Dropping the connection shuts its socket down: the read in
            // flight ends and the descriptor is closed.
            gate.refused(
                now,
                addr,
                gate::Refusal::Timeout,
                &format!(
                    "no complete handshake within {:?}",
                    gate.handshake_timeout()
                ),
            );
            None
        }
    }
}

/// Logs a gate's refusal summaries once a second, for as long as the gate
/// is alive elsewhere.
pub async fn gate_ticker(gate: std::rc::Weak<gate::Gate>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match gate.upgrade() {
            Some(g) => g.tick(Instant::now()),
            None => return,
        }
    }
}

/// Capped exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            max: BACKOFF_MAX,
        }
    }
}

impl Backoff {
    /// A backoff with another ceiling.
    pub fn with_max(max: Duration) -> Backoff {
        Backoff {
            next: BACKOFF_MIN,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn note_failure(ctx: &LinkCtx, e: &LinkError) {
    match e {
        LinkError::AuthFailed { .. } | LinkError::UnexpectedPeer { .. } => ctx
            .stats
            .auth_failures
            .set(ctx.stats.auth_failures.get() + 1),
        LinkError::Wire { .. } | LinkError::Protocol { .. } => {
            ctx.stats.frame_errors.set(ctx.stats.frame_errors.get() + 1)
        }
        _ => {}
    }
}

/// Dials the peer and sends every heartbeat published on `heartbeats`,
/// reconnecting with capped exponential backoff. Runs until the sender side
/// of `heartbeats` is dropped.
pub async fn run_outbound(ctx: Rc<LinkCtx>, mut heartbeats: watch::Receiver<Option<Heartbeat>>) {
    let mut backoff = Backoff::default();
    let mut last_error: Option<String> = None;
    loop {
        let attempt = async {
            let stream =
                TcpStream::connect(ctx.peer_addr)
                    .await
                    .map_err(|source| LinkError::Io {
                        peer: ctx.peer_addr,
                        op: "connect",
                        source,
                    })?;
            // A heartbeat unacknowledged this long means a dead path:
            // reconnect rather than sit in retransmission backoff.
            crate::io::set_user_timeout(&stream, ctx.io_timeout).map_err(|source| {
                LinkError::Io {
                    peer: ctx.peer_addr,
                    op: "set TCP_USER_TIMEOUT",
                    source,
                }
            })?;
            let mut conn = Conn::new(stream, ctx.peer_addr);
            handshake(&mut conn, &ctx, Side::Initiator, Channel::Heartbeat).await?;
            Ok::<Conn, LinkError>(conn)
        };
        // A connect hanging on a peer that was down is given up as soon as
        // the peer connects to us: dial again at once.
        let attempt = async {
            tokio::select! {
                r = tokio::time::timeout(ctx.io_timeout * 2, attempt) => Some(r),
                _ = ctx.redial.notified() => None,
            }
        };
        let Some(outcome) = attempt.await else {
            debug!(peer = %ctx.peer_addr, "the peer connected to us during a dial: dialing it again");
            backoff.reset();
            continue;
        };
        match outcome {
            Ok(Ok(conn)) => {
                backoff.reset();
                last_error = None;
                ctx.stats.outbound_connected.set(true);
                info!(peer = %ctx.peer_addr, "heartbeat link to peer up");
                let end = send_loop(&ctx, &conn, &mut heartbeats).await;
                ctx.stats.outbound_connected.set(false);
                match end {
                    None => return,
                    Some(e) => warn!(peer = %ctx.peer_addr, "heartbeat link to peer down: {e}"),
                }
            }
            Ok(Err(e)) => {
                note_failure(&ctx, &e);
                let msg = e.to_string();
                let refused = matches!(
                    e,
                    LinkError::AuthFailed { .. } | LinkError::UnexpectedPeer { .. }
                );
                // Say it once per kind of failure, not at every retry.
                if refused {
                    warn!(peer = %ctx.peer_addr, "link refused: {msg}");
                } else if last_error.as_deref() != Some(msg.as_str()) {
                    info!(peer = %ctx.peer_addr, "cannot reach peer, retrying with backoff: {msg}");
                } else {
                    debug!(peer = %ctx.peer_addr, "still cannot reach peer: {msg}");
                }
                last_error = Some(msg);
            }
            Err(_) => debug!(peer = %ctx.peer_addr, "connect attempt timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = ctx.redial.notified() => {
                debug!(peer = %ctx.peer_addr, "the peer connected to us: dialing it now");
                backoff.reset();
            }
        }
    }
}

/// Returns `None` when the daemon is shutting down, else why the link broke.
async fn send_loop(
    ctx: &LinkCtx,
    conn: &Conn,
    heartbeats: &mut watch::Receiver<Option<Heartbeat>>,
) -> Option<LinkError> {
    loop {
        let hb = heartbeats.borrow_and_update().clone();
        if let Some(hb) = hb {
            let msg = Message::Heartbeat(hb);
            match tokio::time::timeout(ctx.io_timeout, conn.send(&msg)).await {
                Ok(Ok(())) => ctx
                    .stats
                    .heartbeats_sent
                    .set(ctx.stats.heartbeats_sent.get() + 1),
                Ok(Err(e)) => return Some(e),
                Err(_) => {
                    return Some(LinkError::Timeout {
                        peer: conn.peer(),
                        what: "heartbeat write",
                        after: ctx.io_timeout,
                    })
                }
            }
        }
        if heartbeats.changed().await.is_err() {
            return None;
        }
    }
}

/// Accepts the peer's connections and forwards its heartbeats. Strangers
/// go through `gate` (see [`gate`]); authenticated connections have a
/// budget of their own.
pub async fn run_listener(
    ctx: Rc<LinkCtx>,
    listener: TcpListener,
    gate: Rc<gate::Gate>,
    to_core: mpsc::Sender<Heartbeat>,
) {
    tokio_uring::spawn(gate_ticker(Rc::downgrade(&gate)));
    // Live authenticated connections, oldest first, with a closer each.
    let live: Rc<RefCell<VecDeque<(u64, FrameWriter)>>> = Rc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("accept on heartbeat link failed: {e}");
                tokio::time::sleep(BACKOFF_MIN).await;
                continue;
            }
        };
        let (ctx2, gate, live, tx) = (ctx.clone(), gate.clone(), live.clone(), to_core.clone());
        let id = next_id;
        next_id += 1;
        tokio_uring::spawn(async move {
            let Some((conn, _)) =
                accept_authenticated(&gate, &ctx2, stream, addr, &[Channel::Heartbeat]).await
            else {
                return;
            };
            {
                let mut l = live.borrow_mut();
                while l.len() >= INBOUND_AUTHENTICATED_MAX {
                    if let Some((_, old)) = l.pop_front() {
                        let _ = old.shutdown();
                    }
                }
                l.push_back((id, conn.closer()));
                ctx2.stats.inbound_connections.set(l.len());
            }
            let why = serve_inbound(&ctx2, conn, tx).await;
            {
                let mut l = live.borrow_mut();
                l.retain(|(i, _)| *i != id);
                ctx2.stats.inbound_connections.set(l.len());
            }
            note_failure(&ctx2, &why);
            match why {
                LinkError::AuthFailed { .. } | LinkError::UnexpectedPeer { .. } => {
                    warn!(peer = %addr, "heartbeat link from peer dropped: {why}")
                }
                LinkError::Wire { .. } | LinkError::Protocol { .. } => {
                    warn!(peer = %addr, "dropping link: {why}")
                }
                _ => info!(peer = %addr, "inbound heartbeat link closed: {why}"),
            }
        });
    }
}

async fn serve_inbound(
    ctx: &LinkCtx,
    mut conn: Conn,
    to_core: mpsc::Sender<Heartbeat>,
) -> LinkError {
    info!(peer = %conn.peer(), "heartbeat link from peer up");
    if !ctx.stats.outbound_connected.get() {
        ctx.redial.notify_one();
    }
    // A peer that stops talking is treated as gone after this long.
    let idle = ctx.io_timeout * 2;
    loop {
        match conn.recv_within(idle, "heartbeat").await {
            Ok(Message::Heartbeat(hb)) => {
                let now = Instant::now();
                let stats = &ctx.stats;
                if let Some(prev) = stats.last_received.replace(Some(now)) {
                    let gap = now.duration_since(prev).as_micros() as u64;
                    let _ = stats.gaps_us.borrow_mut().record(gap.max(1));
                }
                stats
                    .heartbeats_received
                    .set(stats.heartbeats_received.get() + 1);
                if hb.node != ctx.peer_name {
                    return LinkError::UnexpectedPeer {
                        peer: conn.peer(),
                        got: hb.node,
                        expected: ctx.peer_name.clone(),
                    };
                }
                // The core only needs the latest news; if it is that far
                // behind, dropping a heartbeat is harmless.
                let _ = to_core.try_send(hb);
            }
            Ok(other) => {
                return LinkError::Protocol {
                    peer: conn.peer(),
                    expected: "heartbeat",
                    got: format!("{:?}", other.kind()),
                }
            }
            Err(e) => return e,
        }
    }
}

/// hasync's framing of spliced content: each chunk one `Bulk` frame.
pub fn bulk_framing() -> crate::io::splice::ChunkFraming {
    crate::io::splice::ChunkFraming {
        max_chunk: crate::wire::BULK_PAYLOAD_BYTES_MAX,
        header_len: crate::wire::BULK_HEADER_LEN,
        header: |len, out| out.copy_from_slice(&crate::wire::bulk_header(len)),
    }
}
