//! Ping quorum: targets (the gateway, a switch) this node must reach to
//! count as connected, as Pacemaker's ping resource and keepalived's
//! tracking do. A prober thread sends an ICMP echo to each IP target (a
//! raw socket; IPv4 and IPv6) or opens a TCP connection to each
//! `host:port` target, every `interval`; a target counts as reached if it
//! answered within the last `window`. The core is told whether a majority
//! is reached, on every change ([`crate::failover::Event::Quorum`]).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// One target: an address answered by ICMP echo, or a TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Icmp(IpAddr),
    Tcp(SocketAddr),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Icmp(ip));
        }
        s.parse::<SocketAddr>()
            .map(Target::Tcp)
            .map_err(|_| "not an IP address (pinged) or an address:port (connected to)".to_string())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Icmp(ip) => write!(f, "{ip}"),
            Target::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

/// Each target's state, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumStatus {
    pub mode: String,
    pub targets: Vec<TargetStatus>,
    pub reached: usize,
    pub majority: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub target: String,
    pub reached: bool,
    pub last_answer_age_ms: Option<u64>,
}

/// Whether `reached` of `total` targets is a majority.
pub fn majority(reached: usize, total: usize) -> bool {
    total > 0 && reached * 2 > total
}

/// The running prober.
pub struct Prober {
    pub status: Arc<Mutex<QuorumStatus>>,
}

const ECHO_ID_BASE: u16 = 0x4853; // "HS"

impl Prober {
    /// Starts the prober thread; `tx` gets the majority on every change
    /// (and once at the first round).
    pub fn start(
        targets: Vec<Target>,
        interval: Duration,
        window: Duration,
        tx: mpsc::UnboundedSender<bool>,
    ) -> std::io::Result<Prober> {
        let status = Arc::new(Mutex::new(QuorumStatus {
            mode: "ping".into(),
            ..QuorumStatus::default()
        }));
        let st = status.clone();
        let v4 = targets
            .iter()
            .any(|t| matches!(t, Target::Icmp(IpAddr::V4(_))))
            .then(|| raw_socket(false))
            .transpose()?;
        let v6 = targets
            .iter()
            .any(|t| matches!(t, Target::Icmp(IpAddr::V6(_))))
            .then(|| raw_socket(true))
            .transpose()?;
        std::thread::Builder::new()
            .name("hasync-quorum".into())
            .spawn(move || run(targets, interval, window, v4, v6, st, tx))?;
        Ok(Prober { status })
    }
}

fn raw_socket(v6: bool) -> std::io::Result<rustix::fd::OwnedFd> {
    let (family, proto) = if v6 {
        (AddressFamily::INET6, rustix::net::ipproto::ICMPV6)
    } else {
        (AddressFamily::INET, rustix::net::ipproto::ICMP)
    };
    let fd = rustix::net::socket(family, SocketType::RAW, Some(proto)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot open a raw ICMP socket for the quorum targets (needs CAP_NET_RAW): {e}"
            ),
        )
    })?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_millis(20)),
    )?;
    Ok(fd)
}

/// The RFC 1071 checksum (ICMPv4; the kernel fills ICMPv6's).
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"hasync quorum");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// An echo reply's identifier in a received packet (IPv4 raw sockets
/// deliver the IP header too).
fn reply_id(v6: bool, pkt: &[u8]) -> Option<u16> {
    let icmp = if v6 {
        pkt
    } else {
        let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
        pkt.get(ihl..)?
    };
    let want = if v6 { 129 } else { 0 };
    if *icmp.first()? != want {
        return None;
    }
    Some(u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]))
}

fn run(
    targets: Vec<Target>,
    interval: Duration,
    window: Duration,
    v4: Option<rustix::fd::OwnedFd>,
    v6: Option<rustix::fd::OwnedFd>,
    status: Arc<Mutex<QuorumStatus>>,
    tx: mpsc::UnboundedSender<bool>,
) {
    let id = ECHO_ID_BASE ^ (std::process::id() as u16);
    let mut last: Vec<Option<Instant>> = vec![None; targets.len()];
    let mut seq = 0u16;
    let mut reported: Option<bool> = None;
    loop {
        let round = Instant::now();
        seq = seq.wrapping_add(1);
        for (i, t) in targets.iter().enumerate() {
            match t {
                Target::Icmp(ip) => {
                    let (fd, is6) = match ip {
                        IpAddr::V4(_) => (v4.as_ref(), false),
                        IpAddr::V6(_) => (v6.as_ref(), true),
                    };
                    if let Some(fd) = fd {
                        let pkt = echo_request(is6, id, seq);
                        let to = SocketAddr::new(*ip, 0);
                        if let Err(e) = rustix::net::sendto(fd, &pkt, SendFlags::empty(), &to) {
                            debug!(target = %t, "quorum probe not sent: {e}");
                        }
                    }
                }
                Target::Tcp(addr) => {
                    let timeout = interval.min(window).max(Duration::from_millis(50));
                    if std::net::TcpStream::connect_timeout(addr, timeout).is_ok() {
                        last[i] = Some(Instant::now());
                    }
                }
            }
        }
        // Replies until the next round.
        let until = round + interval;
        while Instant::now() < until {
            let mut got = false;
            for (fd, is6) in [(v4.as_ref(), false), (v6.as_ref(), true)] {
                let Some(fd) = fd else { continue };
                let mut buf = [0u8; 256];
                if let Ok((_, n, Some(from))) =
                    rustix::net::recvfrom(fd, &mut buf, RecvFlags::empty())
                {
                    got = true;
                    if reply_id(is6, &buf[..n.min(buf.len())]) != Some(id) {
                        continue;
                    }
                    let from: Option<SocketAddr> = SocketAddr::try_from(from).ok();
                    if let Some(from) = from {
                        for (i, t) in targets.iter().enumerate() {
                            if *t == Target::Icmp(from.ip()) {
                                last[i] = Some(Instant::now());
                            }
                        }
                    }
                }
            }
            if !got && v4.is_none() && v6.is_none() {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
        }
        let now = Instant::now();
        let reached: Vec<bool> = last
            .iter()
            .map(|l| l.is_some_and(|t| now.duration_since(t) <= window))
            .collect();
        let n = reached.iter().filter(|r| **r).count();
        let ok = majority(n, targets.len());
        {
            let mut s = status.lock().expect("quorum status lock");
            s.reached = n;
            s.majority = ok;
            s.targets = targets
                .iter()
                .zip(&reached)
                .zip(&last)
                .map(|((t, r), l)| TargetStatus {
                    target: t.to_string(),
                    reached: *r,
                    last_answer_age_ms: l.map(|l| now.duration_since(l).as_millis() as u64),
                })
                .collect();
        }
        if reported != Some(ok) {
            if reported.is_some() {
                if ok {
                    tracing::info!(
                        reached = n,
                        total = targets.len(),
                        "quorum: a majority of the targets is reachable again"
                    );
                } else {
                    warn!(
                        reached = n,
                        total = targets.len(),
                        "quorum: a majority of the targets is unreachable"
                    );
                }
            }
            reported = Some(ok);
            if tx.send(ok).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_ping_or_tcp() {
        assert_eq!(
            "10.0.0.1".parse(),
            Ok(Target::Icmp("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            "fe80::1".parse(),
            Ok(Target::Icmp("fe80::1".parse().unwrap()))
        );
        assert_eq!(
            "10.0.0.1:443".parse(),
            Ok(Target::Tcp("10.0.0.1:443".parse().unwrap()))
        );
        assert!("gateway".parse::<Target>().is_err());
    }

    #[test]
    fn majority_is_more_than_half() {
        assert!(!majority(0, 0));
        assert!(majority(1, 1));
        assert!(!majority(1, 2));
        assert!(majority(2, 3));
        assert!(!majority(2, 4));
    }

    #[test]
    fn echo_requests_checksum_and_replies_parse() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        // A reply: IPv4 header (20 bytes) then type 0 with our id.
        let mut r = vec![0x45u8];
        r.resize(20, 0);
        r.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 7]);
        assert_eq!(reply_id(false, &r), Some(0x1234));
        assert_eq!(
            reply_id(false, &r[..22]),
            None,
            "short packets are not replies"
        );
        assert_eq!(reply_id(true, &[129, 0, 0, 0, 0xab, 0xcd]), Some(0xabcd));
        assert_eq!(reply_id(true, &[128, 0, 0, 0, 0xab, 0xcd]), None);
    }

    #[test]
    fn loopback_answers_a_ping() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = Prober::start(
            vec![Target::Icmp("127.0.0.1".parse().unwrap())],
            Duration::from_millis(100),
            Duration::from_millis(500),
            tx,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(ok) = rx.try_recv() {
                if ok {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "{:?}", p.status.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(p.status.lock().unwrap().reached, 1);
    }
}
