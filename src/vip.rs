//! The service address follows the primary: `[[vip]]` addresses are added
//! to their interfaces (rtnetlink) when the node starts serving, announced
//! (gratuitous ARP for IPv4, unsolicited neighbour advertisement for IPv6)
//! so switches and clients move at once, and removed on demotion, failure,
//! `off` and shutdown, and at start (a previous run may have left them).
//!
//! Netlink runs on a thread of its own with its own small tokio runtime;
//! the daemon sends it commands and reads its status.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::LinkAttribute;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// One service address (`[[vip]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    pub address: IpAddr,
    pub prefix: u8,
    pub interface: String,
}

impl std::fmt::Display for VipSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.address, self.prefix, self.interface)
    }
}

/// Parses `"10.0.0.100/24"` (or an IPv6 address with its prefix length).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or("needs a prefix length, e.g. 10.0.0.100/24")?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    let prefix: u8 = p
        .parse()
        .map_err(|_| format!("{p:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("prefix length {prefix} is over {max}"));
    }
    Ok((addr, prefix))
}

/// What the addresses are doing, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub addresses: Vec<String>,
    /// Held by this node now.
    pub held: bool,
    pub last_error: Option<String>,
}

enum Cmd {
    Acquire(oneshot::Sender<Result<(), String>>),
    Release(oneshot::Sender<Result<(), String>>),
    /// A background release: at most one waits in the queue.
    ReleaseQueued(oneshot::Sender<Result<(), String>>),
}

/// Handle to the VIP thread.
///
/// Its queue is paced by its callers: an acquisition or a waited release
/// per role change, and at most one background release waiting (the
/// self-check asks for one at every tick while the addresses look held on
/// a node that is not primary; a thread stuck in netlink must not gather
/// them).
#[derive(Clone)]
pub struct Vips {
    tx: mpsc::UnboundedSender<Cmd>,
    pub status: Arc<Mutex<VipStatus>>,
    /// A background release is queued and not yet taken by the thread.
    release_queued: Arc<AtomicBool>,
}

/// Announcements sent after the address is added, this far apart.
const ANNOUNCE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(500),
];

impl Vips {
    pub fn start(specs: Vec<VipSpec>) -> std::io::Result<Vips> {
        let status = Arc::new(Mutex::new(VipStatus {
            addresses: specs.iter().map(|s| s.to_string()).collect(),
            ..VipStatus::default()
        }));
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let st = status.clone();
        let release_queued = Arc::new(AtomicBool::new(false));
        let queued = release_queued.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("hasync-vip".into())
            .spawn(move || {
                rt.block_on(async move {
                    let (conn, handle, _) = match rtnetlink::new_connection() {
                        Ok(c) => c,
                        Err(e) => {
                            let why = format!("cannot open a netlink socket: {e}");
                            st.lock().expect("vip status").last_error = Some(why.clone());
                            while let Some(cmd) = rx.recv().await {
                                let (Cmd::Acquire(r) | Cmd::Release(r) | Cmd::ReleaseQueued(r)) =
                                    cmd;
                                queued.store(false, Ordering::Release);
                                let _ = r.send(Err(why.clone()));
                            }
                            return;
                        }
                    };
                    tokio::spawn(conn);
                    while let Some(cmd) = rx.recv().await {
                        let (acquire, reply) = match cmd {
                            Cmd::Acquire(r) => (true, r),
                            Cmd::Release(r) => (false, r),
                            Cmd::ReleaseQueued(r) => {
                                // Taken: a later ask queues another.
                                queued.store(false, Ordering::Release);
                                (false, r)
                            }
                        };
                        let mut errors = Vec::new();
                        // An address added and not announced is held all
                        // the same (a release must take it away).
                        let mut added = false;
                        for s in &specs {
                            let res = if acquire {
                                let (on, res) = add(&handle, s).await;
                                added |= on;
                                res
                            } else {
                                remove(&handle, s).await
                            };
                            if let Err(e) = res {
                                errors.push(format!("{s}: {e}"));
                            }
                        }
                        let res = if errors.is_empty() {
                            Ok(())
                        } else {
                            Err(errors.join("; "))
                        };
                        {
                            let mut g = st.lock().expect("vip status");
                            // A release that failed may have left some.
                            g.held = if acquire {
                                added
                            } else {
                                g.held && res.is_err()
                            };
                            g.last_error = res.as_ref().err().cloned();
                        }
                        let _ = reply.send(res);
                    }
                });
            })?;
        Ok(Vips {
            tx,
            status,
            release_queued,
        })
    }

    /// Adds and announces every address; resolves with the outcome.
    pub fn acquire(&self) -> oneshot::Receiver<Result<(), String>> {
        // A background release queued before this must not stand for one
        // asked after it (it would run first and leave the addresses on a
        // node demoted since): the next ask queues a release of its own.
        self.release_queued.store(false, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Acquire(tx));
        rx
    }

    /// [`Vips::release`] without waiting for the outcome (in status). One
    /// already queued and not yet taken serves this ask too.
    pub fn release_in_background(&self) {
        if self.release_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::ReleaseQueued(tx));
    }

    /// Removes every address this node holds (none held is no error).
    pub fn release(&self) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Release(tx));
        rx
    }
}

/// The interface's index and hardware address.
async fn link(handle: &rtnetlink::Handle, name: &str) -> Result<(u32, Option<[u8; 6]>), String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let msg = links
        .try_next()
        .await
        .map_err(|e| format!("interface {name}: {e}"))?
        .ok_or_else(|| format!("no interface {name}"))?;
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(b);
            Some(m)
        }
        _ => None,
    });
    Ok((msg.header.index, mac))
}

/// Adds and announces `s`: whether the address is on the interface, and
/// the outcome (an announcement that failed leaves it added).
async fn add(handle: &rtnetlink::Handle, s: &VipSpec) -> (bool, Result<(), String>) {
    let (index, mac) = match link(handle, &s.interface).await {
        Ok(l) => l,
        Err(e) => return (false, Err(e)),
    };
    let mut req = handle.address().add(index, s.address, s.prefix).replace();
    if s.address.is_ipv6() {
        // Usable at once, not after duplicate address detection.
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    if let Err(e) = req.execute().await {
        return (false, Err(format!("add: {e}")));
    }
    info!(vip = %s, "service address added");
    (true, announce(s, index, mac).await)
}

/// Gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6)
/// for `s`, added on interface `index`.
async fn announce(s: &VipSpec, index: u32, mac: Option<[u8; 6]>) -> Result<(), String> {
    let Some(mac) = mac else {
        return Ok(()); // No link-layer address (loopback, a tunnel): nothing to announce.
    };
    for d in ANNOUNCE {
        tokio::time::sleep(d).await;
        let sent = match s.address {
            IpAddr::V4(ip) => crate::io::packet::send_gratuitous_arp(index, mac, ip),
            IpAddr::V6(ip) => crate::io::packet::send_unsolicited_na(index, mac, ip),
        };
        if let Err(e) = sent {
            warn!(vip = %s, "cannot announce the service address: {e}");
            return Err(format!("announce: {e}"));
        }
    }
    Ok(())
}

async fn remove(handle: &rtnetlink::Handle, s: &VipSpec) -> Result<(), String> {
    let (index, _) = match link(handle, &s.interface).await {
        Ok(l) => l,
        // The interface is gone, and the address with it.
        Err(e) if e.starts_with("no interface") => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(s.address)
        .execute();
    let mut removed = false;
    while let Some(msg) = found.try_next().await.map_err(|e| format!("list: {e}"))? {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| format!("remove: {e}"))?;
        removed = true;
    }
    if removed {
        info!(vip = %s, "service address removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_with_clear_errors() {
        assert_eq!(
            parse_cidr("10.0.0.100/24"),
            Ok(("10.0.0.100".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("fd00::1/64"),
            Ok(("fd00::1".parse().unwrap(), 64))
        );
        for bad in [
            "10.0.0.100",
            "10.0.0.100/33",
            "fd00::1/129",
            "x/24",
            "10.0.0.1/y",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn background_releases_wait_in_the_queue_one_at_a_time() {
        // A thread that takes nothing (stuck in netlink): a thousand asks
        // queue one release.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stuck = Vips {
            tx,
            status: Arc::default(),
            release_queued: Arc::default(),
        };
        for _ in 0..1000 {
            stuck.release_in_background();
        }
        assert_eq!(rx.len(), 1);
        // An acquisition queued after it: a release asked later (a
        // demotion) is queued after the acquisition, not folded into the
        // release before it.
        let _outcome = stuck.acquire();
        for _ in 0..1000 {
            stuck.release_in_background();
        }
        assert_eq!(rx.len(), 3);
        assert!(matches!(rx.try_recv(), Ok(Cmd::ReleaseQueued(_))));
        assert!(matches!(rx.try_recv(), Ok(Cmd::Acquire(_))));
        assert!(matches!(rx.try_recv(), Ok(Cmd::ReleaseQueued(_))));
    }

    #[test]
    fn a_background_release_taken_by_the_thread_lets_the_next_one_queue() {
        // The real thread and netlink, on an interface that does not exist:
        // every release it runs leaves its error in the status.
        let v = Vips::start(vec![VipSpec {
            address: "192.0.2.77".parse().unwrap(),
            prefix: 32,
            interface: "hasync-none0".into(),
        }])
        .unwrap();
        let ran = || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(e) = v.status.lock().unwrap().last_error.take() {
                    return e;
                }
                assert!(std::time::Instant::now() < deadline, "no release ran");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        v.release_in_background();
        assert!(ran().contains("hasync-none0"));
        v.release_in_background();
        assert!(ran().contains("hasync-none0"), "the second ask was dropped");
    }
}
