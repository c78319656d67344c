//! The raw sockets the network module needs: an rtnetlink socket (`AF_NETLINK`/`NETLINK_ROUTE`)
//! and the DHCP client's UDP socket on port 68, pinned to one interface.
//!
//! Message encoding lives in `net::netlink` and `net::dhcp`; this file only opens, configures,
//! sends and receives, through rustix, except for the three socket options rustix has no setter
//! for (`SO_BINDTODEVICE`, `NETLINK_EXT_ACK`, `NETLINK_CAP_ACK`), set with libc's
//! setsockopt(2). Everything else about the DHCP socket (timeouts, `send_to`) goes through std
//! once the descriptor is wrapped in a std type.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::check;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// setsockopt(2) with the option's value as bytes (for the options rustix does not cover).
fn setsockopt_bytes(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket option value too long"))?;
    // SAFETY: the pointer and length describe the live slice `value`, which setsockopt only
    // reads; `fd` is an open socket we own.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), len) }).map(drop)
}

/// A bound rtnetlink socket talking to the kernel (port id 0).
pub struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    /// Open and bind an `AF_NETLINK`/`NETLINK_ROUTE` socket. Extended acks (the kernel's error
    /// text) and capped acks are asked for but optional. Receives give up after `timeout`, so a
    /// kernel that never answers cannot hang the caller.
    pub fn open_route(timeout: Duration) -> io::Result<Netlink> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None, // NETLINK_ROUTE is protocol 0, the default
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        let _ = setsockopt_bytes(&fd, SOL_NETLINK, NETLINK_EXT_ACK, &1i32.to_ne_bytes());
        let _ = setsockopt_bytes(&fd, SOL_NETLINK, NETLINK_CAP_ACK, &1i32.to_ne_bytes());
        sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(timeout))?;
        Ok(Netlink { fd })
    }

    /// Send one complete netlink message (or batch) to the kernel.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let n = rustix::net::send(&self.fd, msg, SendFlags::empty())?;
        if n != msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "netlink: short send"));
        }
        Ok(())
    }

    /// Receive one datagram (one or more netlink messages). A datagram larger than `buf` is an
    /// error rather than silently cut; a receive timeout is `ErrorKind::WouldBlock`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // With MSG_TRUNC the second number is the datagram's whole length.
            let n = match rustix::net::recv(&self.fd, &mut *buf, RecvFlags::TRUNC) {
                Ok((_, n)) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netlink: a {n}-byte message does not fit the {}-byte buffer", buf.len()),
                ));
            }
            return Ok(n);
        }
    }
}

/// A UDP socket for a DHCP client on `ifname`: bound to 0.0.0.0:68, `SO_BINDTODEVICE` to the
/// interface, `SO_BROADCAST` and `SO_REUSEADDR` set.
///
/// Why this is enough without a packet socket: with the socket bound to a device, Linux routes
/// a send to 255.255.255.255 out of that device even when it has no address and no route
/// (the limited-broadcast case of the output route lookup), with source 0.0.0.0, as long as the
/// interface is up. Replies sent to 255.255.255.255:68 are delivered to this socket for the same
/// reason. Needs `CAP_NET_RAW` (for `SO_BINDTODEVICE`) and `CAP_NET_BIND_SERVICE` (port 68).
pub fn dhcp_socket(ifname: &str) -> io::Result<UdpSocket> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name '{ifname}'")));
    }
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(rustix::net::ipproto::UDP),
    )?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_broadcast(&fd, true)?;
    setsockopt_bytes(&fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, ifname.as_bytes())?;
    rustix::net::bind(&fd, &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_answers_on_a_route_socket() {
        // RTM_GETLINK for ifindex 1 (lo), with an ack: the kernel replies with the link.
        let nl = Netlink::open_route(Duration::from_secs(5)).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len: header + ifinfomsg
        msg.extend_from_slice(&18u16.to_ne_bytes()); // RTM_GETLINK
        msg.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
        msg.extend_from_slice(&7u32.to_ne_bytes()); // sequence number
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id
        msg.extend_from_slice(&[0; 4]); // ifi_family, pad, ifi_type
        msg.extend_from_slice(&1i32.to_ne_bytes()); // ifi_index
        msg.extend_from_slice(&[0; 8]); // ifi_flags, ifi_change
        nl.send(&msg).unwrap();
        let mut buf = vec![0; 64 * 1024];
        let n = nl.recv(&mut buf).unwrap();
        assert!(n >= 16, "{n}");
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        assert_eq!((kind, seq), (16, 7), "RTM_NEWLINK answering our sequence number");
        // Too small a buffer is an error, not a cut message.
        nl.send(&msg).unwrap();
        let e = nl.recv(&mut buf[..20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for bad in ["", "a-name-longer-than-ifnamsiz", "a\0b"] {
            let e = dhcp_socket(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
