//! Admission of connections that have not authenticated yet, on every port
//! hasync listens on (heartbeat, sync/queue).
//!
//! Anyone who can reach a port can open connections; only the peer with the
//! link secret may use one. Strangers must never crowd out the peer, hold
//! descriptors or memory, or flood the log, so:
//!
//! - unauthenticated connections have a budget of their own per port
//!   ([`Limits::strangers_max`]), apart from authenticated ones, and at most
//!   [`Limits::per_address_max`] come from one source address;
//! - the configured peer's address has slots reserved for it
//!   ([`Limits::peer_reserved`]) that other addresses cannot take;
//! - when a pool is full the *oldest* unauthenticated connection is closed to
//!   make room, so holding connections open gains an attacker nothing and a
//!   peer that is handshaking (milliseconds) is not the one evicted;
//! - a handshake has a short deadline ([`Limits::handshake_timeout`]), after
//!   which the socket is closed at once;
//! - refusals are logged once, then summarised every
//!   [`SUMMARY_INTERVAL`] ("refused 12,345 connections from 3 addresses in
//!   the last 10 s"), and counted in status.
//!
//! [`Admission`] and [`RefusalLog`] are pure (time passed in); [`Gate`] is
//! the glue that closes sockets.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::FrameWriter;

/// How often repeated refusals are summarised in the log.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct source addresses remembered per summary (beyond that the
/// summary says "at least").
const SUMMARY_ADDRESSES_MAX: usize = 4096;

/// The bounds of one port's admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unauthenticated connections held at once from addresses other than
    /// the peer's.
    pub strangers_max: usize,
    /// Unauthenticated connections held at once from one such address.
    pub per_address_max: usize,
    /// Unauthenticated connections held at once from the peer's address
    /// (a pool of its own).
    pub peer_reserved: usize,
    /// Time a connection has to authenticate (both handshake frames).
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            strangers_max: 64,
            per_address_max: 8,
            peer_reserved: 8,
            handshake_timeout: Duration::from_secs(2),
        }
    }
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its ticket; give it back with [`Admission::leave`].
    pub id: u64,
    /// An older unauthenticated connection to close first to make room.
    pub evict: Option<u64>,
}

/// Which unauthenticated connections are held, oldest first (sans-IO).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    peer_ip: Option<IpAddr>,
    next_id: u64,
    /// In arrival order: (ticket, source address, from the peer's address).
    waiting: VecDeque<(u64, IpAddr, bool)>,
}

impl Admission {
    pub fn new(limits: Limits, peer_ip: Option<IpAddr>) -> Admission {
        Admission {
            limits,
            peer_ip,
            next_id: 0,
            waiting: VecDeque::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Unauthenticated connections held now.
    pub fn held(&self) -> usize {
        self.waiting.len()
    }

    /// Admits a connection from `ip`, evicting the oldest one of its pool
    /// (or of its address) when that is full. Never refuses: the cost of a
    /// connection is bounded by the pool sizes, and the newest is the one
    /// most likely to be a peer that is about to authenticate.
    pub fn admit(&mut self, ip: IpAddr) -> Admitted {
        let from_peer = self.peer_ip.is_some_and(|p| normalize(p) == normalize(ip));
        let evict = if from_peer {
            self.oldest_over(self.limits.peer_reserved, |_, peer| peer)
        } else {
            let ip = normalize(ip);
            self.oldest_over(self.limits.per_address_max, |a, peer| {
                !peer && normalize(a) == ip
            })
            .or_else(|| self.oldest_over(self.limits.strangers_max, |_, peer| !peer))
        };
        if let Some(v) = evict {
            self.leave(v);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((id, ip, from_peer));
        Admitted { id, evict }
    }

    /// The oldest ticket among those matching `pick`, if they already fill
    /// `cap` (a cap of 0 still admits one at a time).
    fn oldest_over(&self, cap: usize, pick: impl Fn(IpAddr, bool) -> bool) -> Option<u64> {
        let mut matching = self.waiting.iter().filter(|(_, a, p)| pick(*a, *p));
        let first = matching.next()?.0;
        let count = 1 + matching.count();
        (count >= cap.max(1)).then_some(first)
    }

    /// The connection authenticated, failed or was closed.
    pub fn leave(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|(t, _, _)| *t == id) {
            self.waiting.remove(i);
        }
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a connection was turned away or cut before it authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// Wrong secret or wrong node name.
    AuthFailed,
    /// Malformed, oversized or unexpected frames.
    BadFrames,
    /// No complete handshake within the deadline.
    Timeout,
    /// Closed to make room for a newer connection.
    Evicted,
    /// Closed by the other end before authenticating.
    Closed,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::AuthFailed => "authentication failed",
            Refusal::BadFrames => "bad frames",
            Refusal::Timeout => "handshake timed out",
            Refusal::Evicted => "evicted for newer connections",
            Refusal::Closed => "closed before authenticating",
        }
    }
}

/// Rate-limited log of refusals (sans-IO): the first refusal after a quiet
/// spell gets a line of its own with its detail; the rest are counted and
/// summarised once per [`SUMMARY_INTERVAL`].
#[derive(Debug)]
pub struct RefusalLog {
    port: &'static str,
    window_start: Option<Instant>,
    count: u64,
    addresses: HashSet<IpAddr>,
    addresses_overflow: bool,
    reasons: BTreeMap<Refusal, u64>,
}

impl RefusalLog {
    pub fn new(port: &'static str) -> RefusalLog {
        RefusalLog {
            port,
            window_start: None,
            count: 0,
            addresses: HashSet::new(),
            addresses_overflow: false,
            reasons: BTreeMap::new(),
        }
    }

    /// Notes one refusal; returns a line to log now (the first of a window).
    pub fn note(&mut self, now: Instant, ip: IpAddr, why: Refusal, detail: &str) -> Option<String> {
        let first = self.window_start.is_none();
        if first {
            self.window_start = Some(now);
            return Some(format!(
                "{} port: refused a connection from {ip}: {}: {detail} (further refusals are summarised every {}s)",
                self.port,
                why.label(),
                SUMMARY_INTERVAL.as_secs()
            ));
        }
        self.count += 1;
        *self.reasons.entry(why).or_default() += 1;
        if self.addresses.len() < SUMMARY_ADDRESSES_MAX {
            self.addresses.insert(ip);
        } else if !self.addresses.contains(&ip) {
            self.addresses_overflow = true;
        }
        None
    }

    /// At the end of a window: the summary of what was counted in it, if
    /// anything. A window without refusals ends the flood: the next refusal
    /// is logged in full again.
    pub fn tick(&mut self, now: Instant) -> Option<String> {
        let start = self.window_start?;
        if now.saturating_duration_since(start) < SUMMARY_INTERVAL {
            return None;
        }
        if self.count == 0 {
            self.window_start = None;
            return None;
        }
        let reasons: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{} {}", r.label(), thousands(*n)))
            .collect();
        let line = format!(
            "{} port: refused {} connections from {}{} addresses in the last {}s ({})",
            self.port,
            thousands(self.count),
            if self.addresses_overflow {
                "at least "
            } else {
                ""
            },
            thousands(self.addresses.len() as u64),
            now.saturating_duration_since(start).as_secs(),
            reasons.join(", ")
        );
        self.window_start = Some(now);
        self.count = 0;
        self.addresses.clear();
        self.addresses_overflow = false;
        self.reasons.clear();
        Some(line)
    }
}

/// 12345 → "12,345".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Counters of one port's gate, shared with status (atomics: the sync
/// port's gate lives on the replication thread).
#[derive(Debug, Default)]
pub struct GateStats {
    pub unauthenticated: AtomicU64,
    pub authenticated_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub auth_failures: AtomicU64,
    pub frame_errors: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub evicted: AtomicU64,
}

/// What `hasync status` shows of one port's gate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateStatus {
    /// Unauthenticated connections held now.
    pub unauthenticated: u64,
    pub authenticated_total: u64,
    /// Connections closed before they authenticated, for any reason.
    pub refused_total: u64,
    pub auth_failures: u64,
    pub frame_errors: u64,
    pub handshake_timeouts: u64,
    pub evicted: u64,
}

impl GateStats {
    pub fn snapshot(&self) -> GateStatus {
        GateStatus {
            unauthenticated: self.unauthenticated.load(Relaxed),
            authenticated_total: self.authenticated_total.load(Relaxed),
            refused_total: self.refused_total.load(Relaxed),
            auth_failures: self.auth_failures.load(Relaxed),
            frame_errors: self.frame_errors.load(Relaxed),
            handshake_timeouts: self.handshake_timeouts.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
        }
    }
}

/// One port's admission, on the runtime that serves the port.
pub struct Gate {
    admission: RefCell<Admission>,
    /// Handles that close the held unauthenticated connections, by ticket.
    closers: RefCell<HashMap<u64, FrameWriter>>,
    log: RefCell<RefusalLog>,
    pub stats: Arc<GateStats>,
}

/// A held unauthenticated connection; dropping it gives the slot back.
pub struct Ticket<'a> {
    gate: &'a Gate,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.gate.admission.borrow_mut().leave(self.id);
        self.gate.closers.borrow_mut().remove(&self.id);
        self.gate
            .stats
            .unauthenticated
            .store(self.gate.admission.borrow().held() as u64, Relaxed);
    }
}

impl Gate {
    pub fn new(
        port: &'static str,
        limits: Limits,
        peer_ip: Option<IpAddr>,
        stats: Arc<GateStats>,
    ) -> Gate {
        Gate {
            admission: RefCell::new(Admission::new(limits, peer_ip)),
            closers: RefCell::new(HashMap::new()),
            log: RefCell::new(RefusalLog::new(port)),
            stats,
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.admission.borrow().limits().handshake_timeout
    }

    /// Admits a new connection whose socket `closer` can shut down; an
    /// older stranger may be closed to make room.
    pub fn admit(&self, addr: SocketAddr, closer: FrameWriter) -> Ticket<'_> {
        let Admitted { id, evict } = self.admission.borrow_mut().admit(addr.ip());
        if let Some(v) = evict {
            if let Some(old) = self.closers.borrow_mut().remove(&v) {
                // Ends its pending read; its task notes the refusal.
                let _ = old.shutdown();
            }
            self.stats.evicted.fetch_add(1, Relaxed);
        }
        self.closers.borrow_mut().insert(id, closer);
        self.stats
            .unauthenticated
            .store(self.admission.borrow().held() as u64, Relaxed);
        Ticket { gate: self, id }
    }

    /// Whether the connection holding `ticket` was evicted meanwhile.
    pub fn was_evicted(&self, ticket: &Ticket<'_>) -> bool {
        !self.closers.borrow().contains_key(&ticket.id)
    }

    /// Counts and (rate-limited) logs a connection closed before it
    /// authenticated.
    pub fn refused(&self, now: Instant, addr: SocketAddr, why: Refusal, detail: &str) {
        let s = &self.stats;
        s.refused_total.fetch_add(1, Relaxed);
        match why {
            Refusal::AuthFailed => s.auth_failures.fetch_add(1, Relaxed),
            Refusal::BadFrames => s.frame_errors.fetch_add(1, Relaxed),
            Refusal::Timeout => s.handshake_timeouts.fetch_add(1, Relaxed),
            Refusal::Evicted | Refusal::Closed => 0,
        };
        if let Some(line) = self.log.borrow_mut().note(now, addr.ip(), why, detail) {
            warn!("{line}");
        }
    }

    pub fn authenticated(&self) {
        self.stats.authenticated_total.fetch_add(1, Relaxed);
    }

    /// Logs the summary of a window that ended; call about once a second.
    pub fn tick(&self, now: Instant) {
        if let Some(line) = self.log.borrow_mut().tick(now) {
            warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits() -> Limits {
        Limits {
            strangers_max: 4,
            per_address_max: 2,
            peer_reserved: 2,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn strangers_evict_their_own_oldest_and_never_the_peers_slots() {
        let mut a = Admission::new(limits(), Some(ip("10.0.0.2")));
        let peer = a.admit(ip("10.0.0.2"));
        assert_eq!(peer.evict, None);
        // One address fills its own share, then evicts its own oldest.
        let x1 = a.admit(ip("192.0.2.1"));
        let x2 = a.admit(ip("192.0.2.1"));
        assert_eq!((x1.evict, x2.evict), (None, None));
        assert_eq!(a.admit(ip("192.0.2.1")).evict, Some(x1.id));
        // Many addresses fill the strangers' pool and evict the oldest
        // stranger, never the peer's connection.
        let mut evicted = Vec::new();
        for i in 0..100 {
            let t = a.admit(ip(&format!("198.51.100.{i}")));
            evicted.extend(t.evict);
        }
        assert!(!evicted.contains(&peer.id));
        assert_eq!(a.held(), 1 + limits().strangers_max);
        // The peer's pool is bounded too, by its own oldest.
        let p2 = a.admit(ip("10.0.0.2"));
        assert_eq!(p2.evict, None);
        assert_eq!(a.admit(ip("10.0.0.2")).evict, Some(peer.id));
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_same_address() {
        let mut a = Admission::new(limits(), Some(ip("10.0.0.2")));
        let t = a.admit(ip("::ffff:10.0.0.2"));
        let _ = a.admit(ip("10.0.0.2"));
        assert_eq!(a.admit(ip("10.0.0.2")).evict, Some(t.id));
    }

    #[test]
    fn leaving_frees_the_slot() {
        let mut a = Admission::new(limits(), None);
        let t1 = a.admit(ip("192.0.2.1"));
        let _t2 = a.admit(ip("192.0.2.1"));
        a.leave(t1.id);
        assert_eq!(a.admit(ip("192.0.2.1")).evict, None);
        assert_eq!(a.held(), 2);
    }

    #[test]
    fn refusals_are_logged_once_then_summarised_per_window() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new("heartbeat");
        let first = log
            .note(t0, ip("192.0.2.1"), Refusal::AuthFailed, "wrong secret")
            .expect("the first refusal is logged");
        assert!(
            first.contains("192.0.2.1") && first.contains("wrong secret"),
            "{first}"
        );
        for i in 0..12_345u32 {
            let a = ip(&format!("192.0.2.{}", i % 3 + 1));
            assert!(log.note(t0, a, Refusal::Timeout, "").is_none());
        }
        assert!(log.tick(t0 + Duration::from_secs(9)).is_none());
        let summary = log.tick(t0 + SUMMARY_INTERVAL).expect("summary");
        assert!(
            summary.contains("refused 12,345 connections from 3 addresses in the last 10s"),
            "{summary}"
        );
        assert!(summary.contains("handshake timed out 12,345"), "{summary}");
        // A quiet window ends the flood; the next refusal gets its own line.
        assert!(log.tick(t0 + 2 * SUMMARY_INTERVAL).is_none());
        assert!(log
            .note(
                t0 + 3 * SUMMARY_INTERVAL,
                ip("192.0.2.9"),
                Refusal::Evicted,
                ""
            )
            .is_some());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }
}
