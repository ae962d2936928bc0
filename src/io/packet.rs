//! Link-layer sends for the service address: a gratuitous ARP through an
//! `AF_PACKET` socket (IPv4) and an unsolicited neighbour advertisement
//! through an ICMPv6 socket (IPv6), so switches and clients learn at once
//! which machine holds the address. The only unsafe code is the
//! `sockaddr_ll` handed to `sendto`.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::{AddressFamily, SendFlags, SocketType};

/// `struct sockaddr_ll` (packet(7)), laid out as the kernel reads it.
#[repr(C)]
struct SockaddrLl {
    family: u16,
    protocol: u16, // network byte order
    ifindex: i32,
    hatype: u16,
    pkttype: u8,
    halen: u8,
    addr: [u8; 8],
}

const ETH_P_ARP: u16 = 0x0806;

// SAFETY: `with_sockaddr` passes a pointer to a `SockaddrLl` that lives on
// this stack frame for the whole call, with its exact size; the struct is
// `repr(C)` and matches the kernel's `sockaddr_ll` field for field, so the
// kernel reads `size_of::<SockaddrLl>()` valid, initialised bytes.
unsafe impl SocketAddrArg for SockaddrLl {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        f(
            (self as *const SockaddrLl).cast(),
            size_of::<SockaddrLl>() as SocketAddrLen,
        )
    }
}

/// The ARP packet announcing `ip` at `mac` (a gratuitous request: sender
/// and target protocol address are both `ip`).
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    p.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p.push(6);
    p.push(4);
    p.extend_from_slice(&1u16.to_be_bytes()); // request
    p.extend_from_slice(&mac);
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&ip.octets());
    p
}

/// Broadcasts a gratuitous ARP for `ip` on interface `ifindex`.
pub fn send_gratuitous_arp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let proto = rustix::net::Protocol::from_raw(
        std::num::NonZeroU32::new(u32::from(ETH_P_ARP.to_be())).expect("non-zero"),
    );
    let fd = rustix::net::socket(AddressFamily::PACKET, SocketType::DGRAM, Some(proto))?;
    let to = SockaddrLl {
        family: AddressFamily::PACKET.as_raw(),
        protocol: ETH_P_ARP.to_be(),
        ifindex: i32::try_from(ifindex).map_err(io::Error::other)?,
        hatype: 0,
        pkttype: 0,
        halen: 6,
        addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    };
    rustix::net::sendto(&fd, &arp_announcement(mac, ip), SendFlags::empty(), &to)?;
    Ok(())
}

/// The unsolicited neighbour advertisement of `ip` at `mac` (RFC 4861:
/// override set, solicited clear, with the target link-layer address).
pub fn neighbour_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut p = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[2, 1]);
    p.extend_from_slice(&mac);
    p
}

/// Sends an unsolicited neighbour advertisement for `ip` to all nodes on
/// interface `ifindex` (the kernel fills the ICMPv6 checksum).
pub fn send_unsolicited_na(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let fd = rustix::net::socket(
        AddressFamily::INET6,
        SocketType::RAW,
        Some(rustix::net::ipproto::ICMPV6),
    )?;
    // Neighbour discovery messages carry hop limit 255 (RFC 4861 §7.1.2).
    rustix::net::sockopt::set_ipv6_multicast_hops(&fd, 255)?;
    rustix::net::sockopt::set_ipv6_multicast_if(&fd, ifindex)?;
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
    rustix::net::sendto(
        &fd,
        &neighbour_advertisement(mac, ip),
        SendFlags::empty(),
        &all_nodes,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcements_are_laid_out_as_the_rfcs_say() {
        let mac = [0x02, 0, 0, 0, 0, 1];
        let a = arp_announcement(mac, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(a.len(), 28);
        assert_eq!(&a[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&a[8..14], &mac);
        assert_eq!(&a[14..18], &[10, 0, 0, 100]);
        assert_eq!(&a[24..28], &[10, 0, 0, 100]);
        let n = neighbour_advertisement(mac, "fd00::100".parse().unwrap());
        assert_eq!(n.len(), 32);
        assert_eq!(n[0], 136);
        assert_eq!(n[4] & 0x20, 0x20, "override");
        assert_eq!(&n[24..26], &[2, 1]);
        assert_eq!(&n[26..32], &mac);
    }

    #[test]
    fn a_gratuitous_arp_goes_out_on_loopback_without_error() {
        // Loopback has index 1 and an all-zero address.
        send_gratuitous_arp(1, [0; 6], Ipv4Addr::new(127, 0, 0, 1)).unwrap();
    }
}
