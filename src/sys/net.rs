//! The raw sockets the network module needs: an rtnetlink socket (`AF_NETLINK`/`NETLINK_ROUTE`)
//! and the DHCP client's UDP socket on port 68, pinned to one interface.
//!
//! Message encoding lives in `net::netlink` and `net::dhcp`; this file only opens, configures,
//! sends and receives. Everything else about the sockets (timeouts, `send_to`) goes through std
//! once the descriptor is wrapped in a std type.

use std::io;
use std::mem::size_of;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::check;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its exact size is passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers; on success we own the new descriptor.
    let fd = check(unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
        let fd = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl and its exact size is passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let _ = setsockopt_int(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = setsockopt_int(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let tv = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
        // SAFETY: tv is a live timeval and its exact size is passed.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(Netlink { fd })
    }

    /// Send one complete netlink message (or batch) to the kernel.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe the live slice `msg`.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "netlink: short send"));
        }
        Ok(())
    }

    /// Receive one datagram (one or more netlink messages). A datagram larger than `buf` is an
    /// error rather than silently cut; a receive timeout is `ErrorKind::WouldBlock`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe the live, writable slice `buf`.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
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
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_BROADCAST, 1)?;
    // SAFETY: the option value is the interface name's bytes, with their exact length.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr() as *const libc::c_void,
            ifname.len() as libc::socklen_t,
        )
    })?;
    // SAFETY: sockaddr_in is plain old data; all-zero is 0.0.0.0:0.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = 68u16.to_be();
    // SAFETY: addr is a valid sockaddr_in and its exact size is passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(UdpSocket::from(fd))
}
