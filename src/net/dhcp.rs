//! A DHCPv4 client (RFC 2131, options from RFC 2132): DISCOVER → OFFER → REQUEST → ACK,
//! renewal at T1 (unicast REQUEST to the server) and rebinding at T2 (broadcast).
//!
//! The wire format is encoded and parsed by pure functions ([`encode`], [`parse`],
//! [`lease_from_ack`]); the exchanges run over a [`Transport`], which is a UDP socket on port
//! 68 in production ([`UdpTransport`]) and a scripted fake server in the tests.
//!
//! Choices and limits:
//! - Every request before we hold an address sets the broadcast flag, so servers answer to
//!   255.255.255.255, which reaches our plain UDP socket (see `sys::net::dhcp_socket`). A
//!   server that ignores the flag and unicasts the OFFER to the offered address cannot be
//!   heard until that address exists; QEMU's slirp and dnsmasq both honour it (slirp always
//!   broadcasts).
//! - Retransmission: the first wait is [`Timing::first_wait`], doubled on each try, at most
//!   [`Timing::tries`] tries per phase, and the whole acquisition is bounded by
//!   [`Timing::budget`]. No random jitter (one client per link, at boot).
//! - The transaction id comes from std's randomly keyed hasher: unpredictable enough to not
//!   collide with other clients, not a defence against an on-link attacker (nothing in DHCPv4
//!   is).
//! - No ARP probe of the offered address (no DHCPDECLINE), no INIT-REBOOT of a remembered
//!   lease, no DHCPRELEASE on shutdown (like most clients), no option 119 (domain search
//!   list), no option 121 (classless static routes).
//! - Strings (domain, hostname) are kept only when they are plain host names, so a server
//!   cannot inject lines into resolv.conf.

// Route listing, a few accessors and constants serve the namespace tests and diagnostics only.
#![cfg_attr(not(test), allow(dead_code))]

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use super::Error;

pub const SERVER_PORT: u16 = 67;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The fixed BOOTP header, up to and including the magic cookie.
const FIXED_LEN: usize = 240;
/// Requests are padded to BOOTP's minimum size; some relays drop shorter ones.
const MIN_LEN: usize = 300;
pub const BROADCAST_FLAG: u16 = 0x8000;

// Option codes.
pub const OPT_PAD: u8 = 0;
pub const OPT_SUBNET_MASK: u8 = 1;
pub const OPT_ROUTER: u8 = 3;
pub const OPT_DNS: u8 = 6;
pub const OPT_HOSTNAME: u8 = 12;
pub const OPT_DOMAIN: u8 = 15;
pub const OPT_MTU: u8 = 26;
pub const OPT_REQUESTED_IP: u8 = 50;
pub const OPT_LEASE_TIME: u8 = 51;
pub const OPT_OVERLOAD: u8 = 52;
pub const OPT_MESSAGE_TYPE: u8 = 53;
pub const OPT_SERVER_ID: u8 = 54;
pub const OPT_PARAMS: u8 = 55;
pub const OPT_MESSAGE: u8 = 56;
pub const OPT_T1: u8 = 58;
pub const OPT_T2: u8 = 59;
pub const OPT_CLIENT_ID: u8 = 61;
pub const OPT_END: u8 = 255;

/// What we ask servers for (option 55).
pub const PARAMETER_REQUEST_LIST: [u8; 10] = [
    OPT_SUBNET_MASK,
    OPT_ROUTER,
    OPT_DNS,
    OPT_HOSTNAME,
    OPT_DOMAIN,
    OPT_MTU,
    OPT_LEASE_TIME,
    OPT_SERVER_ID,
    OPT_T1,
    OPT_T2,
];

/// Lease time assumed when an ACK carries none (RFC 2131 requires it; some servers omit it).
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Option 51's "infinity".
pub const INFINITE: u32 = u32::MAX;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }
}

/// One DHCP message. `options` keeps wire order when encoding; parsing merges repeated
/// options by concatenation (RFC 3396) and keeps the order of first appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Message {
    fn new(op: u8, xid: u32, chaddr: [u8; 6]) -> Message {
        Message {
            op,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: Vec::new(),
        }
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_slice())
    }

    pub fn message_type(&self) -> Option<MessageType> {
        match self.option(OPT_MESSAGE_TYPE)? {
            [t] => MessageType::from_u8(*t),
            _ => None,
        }
    }

    pub fn ipv4(&self, code: u8) -> Option<Ipv4Addr> {
        let o: [u8; 4] = self.option(code)?.try_into().ok()?;
        Some(Ipv4Addr::from(o))
    }

    /// A list of addresses; None when absent or not a whole number of addresses.
    pub fn ipv4_list(&self, code: u8) -> Option<Vec<Ipv4Addr>> {
        let v = self.option(code)?;
        if v.is_empty() || v.len() % 4 != 0 {
            return None;
        }
        Some(v.chunks_exact(4).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect())
    }

    pub fn u32(&self, code: u8) -> Option<u32> {
        Some(u32::from_be_bytes(self.option(code)?.try_into().ok()?))
    }

    pub fn u16(&self, code: u8) -> Option<u16> {
        Some(u16::from_be_bytes(self.option(code)?.try_into().ok()?))
    }

    /// An option as text, trailing NULs dropped (some servers NUL-terminate).
    pub fn text(&self, code: u8) -> Option<String> {
        let v = self.option(code)?;
        let end = v.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        Some(String::from_utf8_lossy(&v[..end]).into_owned())
    }

    fn push(&mut self, code: u8, value: &[u8]) {
        self.options.push((code, value.to_vec()));
    }
}

/// Encode a message, options in order, each split into ≤255-byte pieces (RFC 3396), then END,
/// padded to 300 bytes.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut b = vec![0u8; FIXED_LEN];
    b[0] = m.op;
    b[1] = HTYPE_ETHER;
    b[2] = 6;
    b[4..8].copy_from_slice(&m.xid.to_be_bytes());
    b[8..10].copy_from_slice(&m.secs.to_be_bytes());
    b[10..12].copy_from_slice(&m.flags.to_be_bytes());
    b[12..16].copy_from_slice(&m.ciaddr.octets());
    b[16..20].copy_from_slice(&m.yiaddr.octets());
    b[20..24].copy_from_slice(&m.siaddr.octets());
    b[24..28].copy_from_slice(&m.giaddr.octets());
    b[28..34].copy_from_slice(&m.chaddr);
    b[236..240].copy_from_slice(&MAGIC);
    for (code, value) in &m.options {
        if *code == OPT_PAD || *code == OPT_END {
            continue;
        }
        if value.is_empty() {
            b.extend_from_slice(&[*code, 0]);
        }
        for piece in value.chunks(255) {
            b.push(*code);
            b.push(piece.len() as u8);
            b.extend_from_slice(piece);
        }
    }
    b.push(OPT_END);
    if b.len() < MIN_LEN {
        b.resize(MIN_LEN, 0);
    }
    b
}

/// Why a datagram is not a DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the 240-byte fixed part.
    Short(usize),
    /// Not hardware type Ethernet with 6-byte addresses.
    NotEthernet {
        htype: u8,
        hlen: u8,
    },
    BadMagic,
    /// An option's length runs past the end of its field.
    TruncatedOption(u8),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Short(n) => write!(f, "{n} bytes is shorter than a DHCP header"),
            ParseError::NotEthernet { htype, hlen } => {
                write!(f, "hardware type {htype} length {hlen} is not Ethernet")
            }
            ParseError::BadMagic => write!(f, "no DHCP magic cookie"),
            ParseError::TruncatedOption(c) => write!(f, "option {c} runs past the end"),
        }
    }
}

/// Append the options in `field` to `out`, merging repeats. Stops at END.
fn parse_options(field: &[u8], out: &mut Vec<(u8, Vec<u8>)>) -> Result<(), ParseError> {
    let mut i = 0;
    while i < field.len() {
        let code = field[i];
        match code {
            OPT_PAD => {
                i += 1;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let len = *field.get(i + 1).ok_or(ParseError::TruncatedOption(code))? as usize;
        let value = field.get(i + 2..i + 2 + len).ok_or(ParseError::TruncatedOption(code))?;
        match out.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => v.extend_from_slice(value),
            None => out.push((code, value.to_vec())),
        }
        i += 2 + len;
    }
    Ok(())
}

/// Parse a DHCP message, including options overloaded into `file` and `sname` (option 52).
pub fn parse(b: &[u8]) -> Result<Message, ParseError> {
    if b.len() < FIXED_LEN {
        return Err(ParseError::Short(b.len()));
    }
    if b[1] != HTYPE_ETHER || b[2] != 6 {
        return Err(ParseError::NotEthernet { htype: b[1], hlen: b[2] });
    }
    if b[236..240] != MAGIC {
        return Err(ParseError::BadMagic);
    }
    let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&b[28..34]);
    let mut m = Message {
        op: b[0],
        xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        secs: u16::from_be_bytes([b[8], b[9]]),
        flags: u16::from_be_bytes([b[10], b[11]]),
        ciaddr: ip(12),
        yiaddr: ip(16),
        siaddr: ip(20),
        giaddr: ip(24),
        chaddr,
        options: Vec::new(),
    };
    parse_options(&b[FIXED_LEN..], &mut m.options)?;
    let overload = match m.option(OPT_OVERLOAD) {
        Some([v]) => *v,
        _ => 0,
    };
    if overload & 1 != 0 {
        parse_options(&b[108..236], &mut m.options)?;
    }
    if overload & 2 != 0 {
        parse_options(&b[44..108], &mut m.options)?;
    }
    Ok(m)
}

/// The options every request of ours carries: type, client id (type 1 + MAC), what we want.
fn request_base(kind: MessageType, xid: u32, mac: [u8; 6]) -> Message {
    let mut m = Message::new(BOOTREQUEST, xid, mac);
    m.push(OPT_MESSAGE_TYPE, &[kind as u8]);
    let mut id = vec![HTYPE_ETHER];
    id.extend_from_slice(&mac);
    m.push(OPT_CLIENT_ID, &id);
    m.push(OPT_PARAMS, &PARAMETER_REQUEST_LIST);
    m
}

/// DHCPDISCOVER, broadcast flag set.
pub fn discover(xid: u32, mac: [u8; 6], secs: u16) -> Message {
    let mut m = request_base(MessageType::Discover, xid, mac);
    m.secs = secs;
    m.flags = BROADCAST_FLAG;
    m
}

/// DHCPREQUEST in SELECTING state: the offered address and the chosen server, broadcast.
pub fn request_selecting(xid: u32, mac: [u8; 6], secs: u16, offered: Ipv4Addr, server: Ipv4Addr) -> Message {
    let mut m = request_base(MessageType::Request, xid, mac);
    m.secs = secs;
    m.flags = BROADCAST_FLAG;
    m.push(OPT_REQUESTED_IP, &offered.octets());
    m.push(OPT_SERVER_ID, &server.octets());
    m
}

/// DHCPREQUEST in RENEWING or REBINDING state: `ciaddr` is the address we hold; no requested
/// address or server id (RFC 2131 4.3.2). We can receive unicast now, so no broadcast flag.
pub fn request_renewing(xid: u32, mac: [u8; 6], ciaddr: Ipv4Addr) -> Message {
    let mut m = request_base(MessageType::Request, xid, mac);
    m.ciaddr = ciaddr;
    m
}

/// An IPv4 lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
    /// Lease duration, renewal (T1) and rebinding (T2) times in seconds from `obtained`;
    /// [`INFINITE`] for a lease that never expires.
    pub lease_secs: u32,
    pub t1: u32,
    pub t2: u32,
    /// The server that granted it (option 54).
    pub server: Ipv4Addr,
    /// When the REQUEST that earned it was sent (RFC 2131 counts the times from there).
    pub obtained: Instant,
}

impl Lease {
    fn at(&self, secs: u32) -> Option<Instant> {
        if self.lease_secs == INFINITE || secs == INFINITE {
            return None;
        }
        self.obtained.checked_add(Duration::from_secs(u64::from(secs)))
    }

    /// When to start renewing; None for an infinite lease.
    pub fn renew_at(&self) -> Option<Instant> {
        self.at(self.t1)
    }

    pub fn rebind_at(&self) -> Option<Instant> {
        self.at(self.t2)
    }

    pub fn expires_at(&self) -> Option<Instant> {
        self.at(self.lease_secs)
    }

    /// Whether `other` configures the system differently (not just new times).
    pub fn differs_in_config(&self, other: &Lease) -> bool {
        (self.address, self.prefix_len, self.router, &self.dns, &self.domain, self.mtu)
            != (other.address, other.prefix_len, other.router, &other.dns, &other.domain, other.mtu)
    }
}

/// A subnet mask as a prefix length; None when the mask is not contiguous.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    if m.checked_shl(ones).unwrap_or(0) != 0 {
        return None;
    }
    Some(ones as u8)
}

/// The classful prefix of an address, for servers that send no subnet mask.
pub fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// A host or domain name safe to write into a config file: letters, digits, `-`, `_`, `.`;
/// several names separated by single spaces (some servers put a search list in option 15).
pub fn clean_name(s: &str) -> Option<String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split(' ').all(|name| {
            !name.is_empty()
                && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        });
    ok.then(|| s.to_string())
}

/// Build a lease from a DHCPACK. `server` is used when the ACK carries no server id.
pub fn lease_from_ack(ack: &Message, server: Ipv4Addr, obtained: Instant) -> Result<Lease, String> {
    let address = ack.yiaddr;
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() || address.is_loopback() {
        return Err(format!("the offered address {address} cannot be used"));
    }
    let prefix_len = match ack.ipv4(OPT_SUBNET_MASK) {
        Some(mask) => mask_to_prefix(mask).ok_or_else(|| format!("subnet mask {mask} is not contiguous"))?,
        None => classful_prefix(address),
    };
    let usable = |a: &Ipv4Addr| !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast();
    let router = ack.ipv4_list(OPT_ROUTER).and_then(|l| l.into_iter().find(usable));
    let dns = ack.ipv4_list(OPT_DNS).unwrap_or_default().into_iter().filter(usable).collect();
    let lease_secs = ack.u32(OPT_LEASE_TIME).unwrap_or(DEFAULT_LEASE_SECS).max(1);
    let (mut t1, mut t2) = if lease_secs == INFINITE {
        (INFINITE, INFINITE)
    } else {
        (
            ack.u32(OPT_T1).unwrap_or(lease_secs / 2),
            ack.u32(OPT_T2).unwrap_or((u64::from(lease_secs) * 7 / 8) as u32),
        )
    };
    if lease_secs != INFINITE && !(t1 <= t2 && t2 <= lease_secs) {
        t1 = lease_secs / 2;
        t2 = (u64::from(lease_secs) * 7 / 8) as u32;
    }
    Ok(Lease {
        address,
        prefix_len,
        router,
        dns,
        domain: ack.text(OPT_DOMAIN).and_then(|s| clean_name(&s)),
        hostname: ack.text(OPT_HOSTNAME).and_then(|s| clean_name(&s)),
        mtu: ack.u16(OPT_MTU).filter(|&m| m >= 68),
        lease_secs,
        t1,
        t2,
        server: ack.ipv4(OPT_SERVER_ID).filter(usable).unwrap_or(server),
        obtained,
    })
}

// ---------------------------------------------------------------------------------------------
// Exchanges

/// Where DHCP messages go and come from.
pub trait Transport {
    fn send(&mut self, packet: &[u8], to: SocketAddrV4) -> io::Result<()>;
    /// Wait up to `timeout` for one datagram; `Ok(None)` when none came in time.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>>;
}

/// The real transport: a UDP socket on port 68 bound to one interface.
pub struct UdpTransport {
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl UdpTransport {
    pub fn open(interface: &str) -> io::Result<UdpTransport> {
        Ok(UdpTransport { sock: crate::sys::net::dhcp_socket(interface)?, buf: vec![0; 4096] })
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, packet: &[u8], to: SocketAddrV4) -> io::Result<()> {
        self.sock.send_to(packet, to).map(drop)
    }

    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        self.sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.sock.recv_from(&mut self.buf) {
            Ok((n, _)) => Ok(Some(self.buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            // An ICMP error for an earlier unicast send (server gone): nothing to read.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::HostUnreachable
                        | io::ErrorKind::NetworkUnreachable
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Some(Vec::new()))
            }
            Err(e) => Err(e),
        }
    }
}

/// Retransmission policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long to wait for an answer to the first transmission; doubled for each retry.
    pub first_wait: Duration,
    /// Transmissions per phase (DISCOVER, REQUEST).
    pub tries: u32,
    /// Bound on a whole acquisition, NAK restarts included.
    pub budget: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing { first_wait: Duration::from_secs(1), tries: 4, budget: Duration::from_secs(15) }
    }
}

/// The DHCP phase that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// DISCOVER, waiting for an OFFER.
    Selecting,
    /// REQUEST after an OFFER, waiting for the ACK.
    Requesting,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Selecting => "no DHCPOFFER answered DHCPDISCOVER",
            Phase::Requesting => "no DHCPACK answered DHCPREQUEST",
        })
    }
}

/// The server's answer to a REQUEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ack(Lease),
    Nak { server: Ipv4Addr, message: Option<String> },
}

/// NAKs in a row after which acquisition gives up.
const MAX_NAKS: u32 = 3;

fn limited_broadcast() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT)
}

/// A fresh transaction id.
pub fn new_xid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

/// A DHCP client for one interface.
pub struct Client<T: Transport> {
    transport: T,
    interface: String,
    mac: [u8; 6],
    timing: Timing,
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T, interface: &str, mac: [u8; 6], timing: Timing) -> Client<T> {
        Client { transport, interface: interface.to_string(), mac, timing }
    }

    /// Send `packet` once and listen until `until` for a reply to `xid` that `accept` takes.
    /// Returns None when none came. `last_send_error` remembers a failed send (the timeout
    /// error reports it): a link without carrier fails sends, and a later try may succeed.
    fn transact<R>(
        &mut self,
        packet: &[u8],
        to: SocketAddrV4,
        xid: u32,
        until: Instant,
        last_send_error: &mut Option<String>,
        accept: &mut dyn FnMut(&Message) -> Option<R>,
    ) -> Result<Option<R>, Error> {
        if let Err(e) = self.transport.send(packet, to) {
            log::warn!("dhcp: {}: sending to {to} failed: {e}", self.interface);
            *last_send_error = Some(e.to_string());
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let got = self
                .transport
                .recv(left)
                .map_err(|cause| Error::DhcpSocket { interface: self.interface.clone(), cause })?;
            let Some(bytes) = got else { return Ok(None) };
            let Ok(m) = parse(&bytes) else { continue };
            if m.op != BOOTREPLY || m.xid != xid || m.chaddr != self.mac {
                continue;
            }
            if let Some(r) = accept(&m) {
                return Ok(Some(r));
            }
        }
    }

    /// Up to `tries` transmissions of `build(secs)` with doubling waits, within `deadline`.
    fn phase<R>(
        &mut self,
        phase: Phase,
        xid: u32,
        started: Instant,
        deadline: Instant,
        build: &dyn Fn(u16) -> Message,
        accept: &mut dyn FnMut(&Message) -> Option<R>,
    ) -> Result<R, Error> {
        let phase_start = Instant::now();
        let mut wait = self.timing.first_wait;
        let mut sent = 0;
        let mut last_send_error = None;
        while sent < self.timing.tries {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let secs = now.duration_since(started).as_secs().min(u64::from(u16::MAX)) as u16;
            let packet = encode(&build(secs));
            sent += 1;
            let until = (now + wait).min(deadline);
            if let Some(r) =
                self.transact(&packet, limited_broadcast(), xid, until, &mut last_send_error, accept)?
            {
                return Ok(r);
            }
            wait = wait.saturating_mul(2);
        }
        Err(Error::DhcpTimeout {
            interface: self.interface.clone(),
            phase,
            tries: sent,
            waited: phase_start.elapsed(),
            last_send_error,
        })
    }

    /// INIT → SELECTING → REQUESTING → BOUND: get a lease, restarting after a NAK.
    pub fn acquire(&mut self) -> Result<Lease, Error> {
        let started = Instant::now();
        let deadline = started + self.timing.budget;
        let mac = self.mac;
        let mut naks = 0;
        loop {
            let xid = new_xid();
            let (offered, server) = self.phase(
                Phase::Selecting,
                xid,
                started,
                deadline,
                &|secs| discover(xid, mac, secs),
                &mut |m| {
                    let server = m.ipv4(OPT_SERVER_ID)?;
                    let ok = m.message_type() == Some(MessageType::Offer) && !m.yiaddr.is_unspecified();
                    ok.then_some((m.yiaddr, server))
                },
            )?;
            log::info!("dhcp: {}: {server} offers {offered}", self.interface);
            // The lease's times count from the first REQUEST (a little early, so renewal is too).
            let sent_at = Instant::now();
            let answer = self.phase(
                Phase::Requesting,
                xid,
                started,
                deadline,
                &|secs| request_selecting(xid, mac, secs, offered, server),
                &mut |m| {
                    // Another server's reply to our broadcast REQUEST is not for us.
                    if m.ipv4(OPT_SERVER_ID).is_some_and(|s| s != server) {
                        return None;
                    }
                    answer_of(m, server, sent_at)
                },
            );
            match answer? {
                Answer::Ack(lease) => return Ok(lease),
                Answer::Nak { server, message } => {
                    naks += 1;
                    log::warn!(
                        "dhcp: {}: {server} refused {offered}: {}",
                        self.interface,
                        message.as_deref().unwrap_or("no reason given")
                    );
                    if naks >= MAX_NAKS || Instant::now() >= deadline {
                        return Err(Error::DhcpNak { interface: self.interface.clone(), server, message });
                    }
                }
            }
        }
    }

    /// One renewal (unicast to the lease's server) or rebinding (broadcast) transmission,
    /// listening up to `wait`. `Ok(None)`: no answer.
    pub fn renew(&mut self, lease: &Lease, rebinding: bool, wait: Duration) -> Result<Option<Answer>, Error> {
        let xid = new_xid();
        let to = if rebinding { limited_broadcast() } else { SocketAddrV4::new(lease.server, SERVER_PORT) };
        let packet = encode(&request_renewing(xid, self.mac, lease.address));
        let sent_at = Instant::now();
        let mut last_send_error = None;
        let server = lease.server;
        let got = self.transact(&packet, to, xid, sent_at + wait, &mut last_send_error, &mut |m| {
            answer_of(m, server, sent_at)
        })?;
        if got.is_none() {
            if let Some(e) = last_send_error {
                log::warn!("dhcp: {}: renewal request not sent: {e}", self.interface);
            }
        }
        Ok(got)
    }
}

/// An ACK (that yields a usable lease) or a NAK; anything else is not an answer.
fn answer_of(m: &Message, server: Ipv4Addr, sent_at: Instant) -> Option<Answer> {
    match m.message_type()? {
        MessageType::Ack => match lease_from_ack(m, server, sent_at) {
            Ok(lease) => Some(Answer::Ack(lease)),
            Err(why) => {
                log::warn!("dhcp: ignoring a DHCPACK from {server}: {why}");
                None
            }
        },
        MessageType::Nak => Some(Answer::Nak {
            server: m.ipv4(OPT_SERVER_ID).unwrap_or(server),
            message: m.text(OPT_MESSAGE),
        }),
        _ => None,
    }
}

/// Where a lease stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing to do until the given time (None: an infinite lease).
    Bound(Option<Instant>),
    /// Past T1: unicast REQUESTs to the server until the given time (T2).
    Renewing(Instant),
    /// Past T2: broadcast REQUESTs until the given time (expiry).
    Rebinding(Instant),
    Expired,
}

/// The lease's state at `now`.
pub fn state_at(lease: &Lease, now: Instant) -> State {
    let (Some(t1), Some(t2), Some(end)) = (lease.renew_at(), lease.rebind_at(), lease.expires_at()) else {
        return State::Bound(None);
    };
    if now < t1 {
        State::Bound(Some(t1))
    } else if now < t2 {
        State::Renewing(t2)
    } else if now < end {
        State::Rebinding(end)
    } else {
        State::Expired
    }
}

/// How long to listen after a renewal or rebinding REQUEST: half the time left until `until`,
/// but at least 60 s (RFC 2131 4.4.5), and never past `until`.
pub fn retransmit_wait(now: Instant, until: Instant) -> Duration {
    let left = until.saturating_duration_since(now);
    (left / 2).max(Duration::from_secs(60)).min(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn discover_wire_format() {
        let b = encode(&discover(0xdead_beef, MAC, 3));
        assert_eq!(b.len(), MIN_LEN);
        assert_eq!(&b[0..4], &[BOOTREQUEST, 1, 6, 0]);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[8..10], &[0, 3]);
        assert_eq!(&b[10..12], &[0x80, 0]);
        assert_eq!(&b[28..34], &MAC);
        assert_eq!(&b[236..240], &MAGIC);
        let opts = &b[240..];
        assert_eq!(&opts[0..3], &[OPT_MESSAGE_TYPE, 1, 1]);
        assert_eq!(&opts[3..12], &[OPT_CLIENT_ID, 7, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(opts[12], OPT_PARAMS);
        assert_eq!(&opts[14..14 + PARAMETER_REQUEST_LIST.len()], &PARAMETER_REQUEST_LIST);
        assert_eq!(opts[14 + PARAMETER_REQUEST_LIST.len()], OPT_END);
    }

    #[test]
    fn requests_by_state() {
        // (name, message, type, flags, ciaddr, requested ip, server id)
        let offered = ip("10.0.2.15");
        let cases = [
            ("discover", discover(1, MAC, 0), MessageType::Discover, BROADCAST_FLAG, None, None, None),
            (
                "selecting",
                request_selecting(1, MAC, 0, offered, SERVER),
                MessageType::Request,
                BROADCAST_FLAG,
                None,
                Some(offered),
                Some(SERVER),
            ),
            (
                "renewing",
                request_renewing(1, MAC, offered),
                MessageType::Request,
                0,
                Some(offered),
                None,
                None,
            ),
        ];
        for (name, m, kind, flags, ciaddr, requested, server) in cases {
            let back = parse(&encode(&m)).unwrap();
            assert_eq!(back, m, "{name}: round trip");
            assert_eq!(back.message_type(), Some(kind), "{name}");
            assert_eq!(back.flags, flags, "{name}");
            assert_eq!(back.ciaddr, ciaddr.unwrap_or(Ipv4Addr::UNSPECIFIED), "{name}");
            assert_eq!(back.ipv4(OPT_REQUESTED_IP), requested, "{name}");
            assert_eq!(back.ipv4(OPT_SERVER_ID), server, "{name}");
            assert_eq!(back.option(OPT_PARAMS), Some(&PARAMETER_REQUEST_LIST[..]), "{name}");
        }
    }

    /// A reply as a server would build it.
    fn reply(kind: MessageType, xid: u32, yiaddr: &str, opts: &[(u8, &[u8])]) -> Message {
        let mut m = Message::new(BOOTREPLY, xid, MAC);
        m.yiaddr = ip(yiaddr);
        m.push(OPT_MESSAGE_TYPE, &[kind as u8]);
        for (c, v) in opts {
            m.push(*c, v);
        }
        m
    }

    fn slirp_ack(xid: u32) -> Message {
        reply(
            MessageType::Ack,
            xid,
            "10.0.2.15",
            &[
                (OPT_SERVER_ID, &[10, 0, 2, 2]),
                (OPT_SUBNET_MASK, &[255, 255, 255, 0]),
                (OPT_ROUTER, &[10, 0, 2, 2]),
                (OPT_DNS, &[10, 0, 2, 3]),
                (OPT_LEASE_TIME, &86400u32.to_be_bytes()),
            ],
        )
    }

    #[test]
    fn parse_errors() {
        let good = encode(&slirp_ack(1));
        let mut not_eth = good.clone();
        not_eth[1] = 6;
        let mut bad_magic = good.clone();
        bad_magic[236] = 0;
        let mut truncated = good[..FIXED_LEN].to_vec();
        truncated.extend_from_slice(&[OPT_DNS, 8, 10, 0, 2, 3]);
        let cases: Vec<(&str, Vec<u8>, Result<(), ParseError>)> = vec![
            ("good", good.clone(), Ok(())),
            ("empty", vec![], Err(ParseError::Short(0))),
            ("short", good[..239].to_vec(), Err(ParseError::Short(239))),
            ("not ethernet", not_eth, Err(ParseError::NotEthernet { htype: 6, hlen: 6 })),
            ("bad magic", bad_magic, Err(ParseError::BadMagic)),
            ("truncated option", truncated, Err(ParseError::TruncatedOption(OPT_DNS))),
            ("no end option", good[..FIXED_LEN + 3].to_vec(), Ok(())),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(parse(&bytes).map(drop), want, "{name}");
        }
    }

    #[test]
    fn long_and_split_options_and_overload() {
        // A 300-byte option is split on the wire and joined when parsed.
        let mut m = reply(MessageType::Ack, 1, "10.0.0.2", &[]);
        let long: Vec<u8> = (0..300).map(|i| (i % 251) as u8).collect();
        m.push(OPT_DNS, &long);
        let wire = encode(&m);
        assert_eq!(parse(&wire).unwrap().option(OPT_DNS), Some(&long[..]));

        // Options overloaded into `file` (1) and `sname` (2), read in that order.
        let mut wire = encode(&reply(MessageType::Ack, 1, "10.0.0.2", &[(OPT_OVERLOAD, &[3])]));
        wire[108..112].copy_from_slice(&[OPT_DOMAIN, 2, b'a', b'b']);
        wire[112] = OPT_END;
        wire[44..48].copy_from_slice(&[OPT_DOMAIN, 2, b'c', b'd']);
        wire[48] = OPT_END;
        let back = parse(&wire).unwrap();
        assert_eq!(back.text(OPT_DOMAIN).as_deref(), Some("abcd"));
    }

    #[test]
    fn masks() {
        let cases = [
            ("255.255.255.0", Some(24)),
            ("255.255.255.255", Some(32)),
            ("0.0.0.0", Some(0)),
            ("255.255.252.0", Some(22)),
            ("255.0.255.0", None),
            ("0.255.255.255", None),
        ];
        for (mask, want) in cases {
            assert_eq!(mask_to_prefix(ip(mask)), want, "{mask}");
        }
        assert_eq!(classful_prefix(ip("10.1.2.3")), 8);
        assert_eq!(classful_prefix(ip("172.16.0.1")), 16);
        assert_eq!(classful_prefix(ip("192.168.1.1")), 24);
    }

    #[test]
    fn names() {
        let cases = [
            ("example.com", Some("example.com")),
            ("example.com\0", None),
            (" corp.example.com ", Some("corp.example.com")),
            ("a.example b.example", Some("a.example b.example")),
            ("evil\nnameserver 6.6.6.6", None),
            ("a  b", None),
            ("", None),
            ("dom;rm", None),
        ];
        for (input, want) in cases {
            assert_eq!(clean_name(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn leases_from_acks() {
        let t = Instant::now();
        /// prefix, router, dns, lease, T1, T2
        type Want = (u8, Option<&'static str>, Vec<&'static str>, u32, u32, u32);
        struct Case {
            name: &'static str,
            ack: Message,
            want: Result<Want, ()>,
        }
        let cases = [
            Case {
                name: "slirp",
                ack: slirp_ack(1),
                want: Ok((24, Some("10.0.2.2"), vec!["10.0.2.3"], 86400, 43200, 75600)),
            },
            Case {
                name: "explicit T1/T2, two dns, broadcast dns dropped",
                ack: reply(
                    MessageType::Ack,
                    1,
                    "192.168.1.50",
                    &[
                        (OPT_SERVER_ID, &[192, 168, 1, 1]),
                        (OPT_SUBNET_MASK, &[255, 255, 0, 0]),
                        (OPT_DNS, &[1, 1, 1, 1, 255, 255, 255, 255, 8, 8, 8, 8]),
                        (OPT_LEASE_TIME, &600u32.to_be_bytes()),
                        (OPT_T1, &100u32.to_be_bytes()),
                        (OPT_T2, &200u32.to_be_bytes()),
                    ],
                ),
                want: Ok((16, None, vec!["1.1.1.1", "8.8.8.8"], 600, 100, 200)),
            },
            Case {
                name: "T1 after T2 falls back to defaults; no mask is classful",
                ack: reply(
                    MessageType::Ack,
                    1,
                    "172.16.5.5",
                    &[
                        (OPT_LEASE_TIME, &800u32.to_be_bytes()),
                        (OPT_T1, &700u32.to_be_bytes()),
                        (OPT_T2, &600u32.to_be_bytes()),
                    ],
                ),
                want: Ok((16, None, vec![], 800, 400, 700)),
            },
            Case {
                name: "no lease time",
                ack: reply(MessageType::Ack, 1, "10.0.0.9", &[(OPT_SUBNET_MASK, &[255, 255, 255, 0])]),
                want: Ok((24, None, vec![], DEFAULT_LEASE_SECS, 1800, 3150)),
            },
            Case {
                name: "infinite",
                ack: reply(MessageType::Ack, 1, "10.0.0.9", &[(OPT_LEASE_TIME, &INFINITE.to_be_bytes())]),
                want: Ok((8, None, vec![], INFINITE, INFINITE, INFINITE)),
            },
            Case { name: "zero address", ack: reply(MessageType::Ack, 1, "0.0.0.0", &[]), want: Err(()) },
            Case {
                name: "holey mask",
                ack: reply(MessageType::Ack, 1, "10.0.0.9", &[(OPT_SUBNET_MASK, &[255, 0, 255, 0])]),
                want: Err(()),
            },
        ];
        for c in cases {
            let got = lease_from_ack(&c.ack, SERVER, t);
            match (got, c.want) {
                (Ok(l), Ok((prefix, router, dns, secs, t1, t2))) => {
                    assert_eq!(l.prefix_len, prefix, "{}", c.name);
                    assert_eq!(l.router, router.map(ip), "{}", c.name);
                    assert_eq!(l.dns, dns.into_iter().map(ip).collect::<Vec<_>>(), "{}", c.name);
                    assert_eq!((l.lease_secs, l.t1, l.t2), (secs, t1, t2), "{}", c.name);
                }
                (Err(_), Err(())) => {}
                (got, _) => panic!("{}: got {got:?}", c.name),
            }
        }
        // The server id falls back to the one we chose; domain/hostname/mtu come through.
        let l = lease_from_ack(
            &reply(
                MessageType::Ack,
                1,
                "10.0.0.9",
                &[
                    (OPT_DOMAIN, b"example.com\0"),
                    (OPT_HOSTNAME, b"node1"),
                    (OPT_MTU, &1400u16.to_be_bytes()),
                ],
            ),
            SERVER,
            t,
        )
        .unwrap();
        assert_eq!(l.server, SERVER);
        assert_eq!(l.domain.as_deref(), Some("example.com"));
        assert_eq!(l.hostname.as_deref(), Some("node1"));
        assert_eq!(l.mtu, Some(1400));
    }

    #[test]
    fn lease_states() {
        let t = Instant::now();
        let mut l = lease_from_ack(&slirp_ack(1), SERVER, t).unwrap();
        (l.lease_secs, l.t1, l.t2) = (100, 50, 80);
        let s = |n: u64| t + Duration::from_secs(n);
        let cases = [
            (0, State::Bound(Some(s(50)))),
            (49, State::Bound(Some(s(50)))),
            (50, State::Renewing(s(80))),
            (79, State::Renewing(s(80))),
            (80, State::Rebinding(s(100))),
            (100, State::Expired),
            (1000, State::Expired),
        ];
        for (at, want) in cases {
            assert_eq!(state_at(&l, s(at)), want, "at {at}s");
        }
        l.lease_secs = INFINITE;
        assert_eq!(state_at(&l, s(10_000)), State::Bound(None));

        let waits = [(1000, 500), (200, 100), (100, 60), (30, 30), (0, 0)];
        for (left, want) in waits {
            assert_eq!(retransmit_wait(t, s(left)), Duration::from_secs(want), "{left}s left");
        }
    }

    type Respond = Box<dyn FnMut(&Message, SocketAddrV4) -> Vec<Message>>;

    /// A scripted server: for each request it is sent, `respond` returns the replies to queue.
    struct FakeServer {
        respond: Respond,
        queue: VecDeque<Vec<u8>>,
        sent: Vec<(Message, SocketAddrV4)>,
        waits: Vec<Duration>,
    }

    impl FakeServer {
        fn new(respond: impl FnMut(&Message, SocketAddrV4) -> Vec<Message> + 'static) -> FakeServer {
            FakeServer {
                respond: Box::new(respond),
                queue: VecDeque::new(),
                sent: Vec::new(),
                waits: Vec::new(),
            }
        }
    }

    impl Transport for &mut FakeServer {
        fn send(&mut self, packet: &[u8], to: SocketAddrV4) -> io::Result<()> {
            let m = parse(packet).expect("client sends parseable messages");
            for r in (self.respond)(&m, to) {
                self.queue.push_back(encode(&r));
            }
            self.sent.push((m, to));
            Ok(())
        }

        fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
            let next = self.queue.pop_front();
            if next.is_none() {
                self.waits.push(timeout);
            }
            Ok(next)
        }
    }

    /// A well-behaved server offering 10.0.2.15, optionally NAKing the first `naks` requests.
    fn server(naks: u32) -> impl FnMut(&Message, SocketAddrV4) -> Vec<Message> {
        let mut naked = 0;
        move |m, _| match m.message_type() {
            Some(MessageType::Discover) => {
                vec![reply(MessageType::Offer, m.xid, "10.0.2.15", &[(OPT_SERVER_ID, &[10, 0, 2, 2])])]
            }
            Some(MessageType::Request) if naked < naks => {
                naked += 1;
                vec![reply(
                    MessageType::Nak,
                    m.xid,
                    "0.0.0.0",
                    &[(OPT_SERVER_ID, &[10, 0, 2, 2]), (OPT_MESSAGE, b"wrong network")],
                )]
            }
            Some(MessageType::Request) => vec![slirp_ack(m.xid)],
            _ => vec![],
        }
    }

    fn types(f: &FakeServer) -> Vec<MessageType> {
        f.sent.iter().filter_map(|(m, _)| m.message_type()).collect()
    }

    #[test]
    fn acquisition_scenarios() {
        use MessageType::{Discover as D, Request as R};
        /// Ok(leased address) or Err(a fragment of the error's text)
        type Want = Result<&'static str, &'static str>;
        // (name, server, outcome, requests sent)
        let cases: Vec<(&str, Respond, Want, Vec<MessageType>)> = vec![
            ("offer then ack", Box::new(server(0)), Ok("10.0.2.15"), vec![D, R]),
            ("one nak restarts", Box::new(server(1)), Ok("10.0.2.15"), vec![D, R, D, R]),
            ("naks give up", Box::new(server(9)), Err("refused"), vec![D, R, D, R, D, R]),
            ("silence", Box::new(|_: &Message, _| vec![]), Err("DHCPDISCOVER"), vec![D, D, D, D]),
            (
                "offer but no ack",
                Box::new(|m: &Message, _| match m.message_type() {
                    Some(MessageType::Discover) => vec![reply(
                        MessageType::Offer,
                        m.xid,
                        "10.0.2.15",
                        &[(OPT_SERVER_ID, &[10, 0, 2, 2])],
                    )],
                    _ => vec![],
                }),
                Err("DHCPREQUEST"),
                vec![D, R, R, R, R],
            ),
            (
                "wrong xid, wrong mac, other server's ack, offer without server id: all ignored",
                Box::new(|m: &Message, _| {
                    let mut wrong_mac = slirp_ack(m.xid);
                    wrong_mac.chaddr = [1; 6];
                    let mut other = slirp_ack(m.xid);
                    other.options.retain(|(c, _)| *c != OPT_SERVER_ID);
                    other.push(OPT_SERVER_ID, &[10, 0, 2, 99]);
                    match m.message_type() {
                        Some(MessageType::Discover) => vec![
                            reply(
                                MessageType::Offer,
                                m.xid ^ 1,
                                "10.0.2.16",
                                &[(OPT_SERVER_ID, &[10, 0, 2, 2])],
                            ),
                            reply(MessageType::Offer, m.xid, "10.0.2.17", &[]),
                            reply(MessageType::Offer, m.xid, "10.0.2.15", &[(OPT_SERVER_ID, &[10, 0, 2, 2])]),
                        ],
                        Some(MessageType::Request) => vec![wrong_mac, other, slirp_ack(m.xid)],
                        _ => vec![],
                    }
                }),
                Ok("10.0.2.15"),
                vec![D, R],
            ),
        ];
        for (name, respond, want, sent) in cases {
            let mut fake =
                FakeServer { respond, queue: VecDeque::new(), sent: Vec::new(), waits: Vec::new() };
            let got = Client::new(&mut fake, "eth0", MAC, Timing::default()).acquire();
            match (&got, want) {
                (Ok(l), Ok(addr)) => assert_eq!(l.address, ip(addr), "{name}"),
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{name}: {e}"),
                _ => panic!("{name}: got {got:?}"),
            }
            assert_eq!(types(&fake), sent, "{name}");
            for (m, to) in &fake.sent {
                assert_eq!(*to, limited_broadcast(), "{name}: acquisition broadcasts");
                assert_eq!(m.flags, BROADCAST_FLAG, "{name}");
            }
        }
    }

    #[test]
    fn backoff_doubles_from_one_second() {
        let mut fake = FakeServer::new(|_, _| vec![]);
        let err = Client::new(&mut fake, "eth0", MAC, Timing::default()).acquire().unwrap_err();
        let secs: Vec<u64> = fake.waits.iter().map(|d| d.as_millis().div_ceil(1000) as u64).collect();
        assert_eq!(secs, vec![1, 2, 4, 8]);
        match err {
            Error::DhcpTimeout { phase, tries, interface, .. } => {
                assert_eq!((phase, tries, interface.as_str()), (Phase::Selecting, 4, "eth0"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn selecting_request_names_the_offer() {
        let mut fake = FakeServer::new(server(0));
        let lease = Client::new(&mut fake, "eth0", MAC, Timing::default()).acquire().unwrap();
        let (req, _) = &fake.sent[1];
        assert_eq!(req.ipv4(OPT_REQUESTED_IP), Some(ip("10.0.2.15")));
        assert_eq!(req.ipv4(OPT_SERVER_ID), Some(SERVER));
        assert_eq!(req.xid, fake.sent[0].0.xid, "one transaction");
        assert_eq!(lease.server, SERVER);
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(lease.dns, vec![ip("10.0.2.3")]);
    }

    #[test]
    fn renew_and_rebind() {
        let lease = lease_from_ack(&slirp_ack(1), SERVER, Instant::now()).unwrap();
        // (rebinding, destination, answer)
        let cases = [
            (false, SocketAddrV4::new(SERVER, SERVER_PORT), true),
            (true, limited_broadcast(), true),
            (false, SocketAddrV4::new(SERVER, SERVER_PORT), false),
        ];
        for (rebinding, dest, answers) in cases {
            let mut fake = FakeServer::new(move |m, _| if answers { vec![slirp_ack(m.xid)] } else { vec![] });
            let got = Client::new(&mut fake, "eth0", MAC, Timing::default())
                .renew(&lease, rebinding, Duration::from_secs(60))
                .unwrap();
            let (req, to) = &fake.sent[0];
            assert_eq!(*to, dest, "rebinding={rebinding}");
            assert_eq!(req.ciaddr, lease.address);
            assert_eq!(req.flags, 0);
            assert_eq!(req.option(OPT_REQUESTED_IP), None);
            assert_eq!(req.option(OPT_SERVER_ID), None);
            match got {
                Some(Answer::Ack(l)) => {
                    assert!(answers);
                    assert!(!l.differs_in_config(&lease));
                }
                None => assert!(!answers),
                other => panic!("{other:?}"),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Ok(m) = parse(&data) {
                let _ = lease_from_ack(&m, SERVER, Instant::now());
                let _ = m.ipv4_list(OPT_DNS);
                let _ = m.text(OPT_DOMAIN);
            }
        }

        #[test]
        fn parse_never_panics_after_a_valid_header(
            opts in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            overload in 0u8..4,
        ) {
            let mut wire = encode(&reply(MessageType::Ack, 1, "10.0.0.2", &[(OPT_OVERLOAD, &[overload])]));
            wire.truncate(FIXED_LEN + 3);
            wire.extend_from_slice(&opts);
            if let Ok(m) = parse(&wire) {
                let _ = lease_from_ack(&m, SERVER, Instant::now());
            }
        }

        #[test]
        fn options_round_trip(
            opts in proptest::collection::vec((1u8..255, proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300)), 0..6),
        ) {
            let mut m = reply(MessageType::Offer, 7, "10.0.0.2", &[]);
            m.options.clear();
            for (c, v) in &opts {
                if c != &OPT_OVERLOAD && m.option(*c).is_none() {
                    m.push(*c, v);
                }
            }
            proptest::prop_assert_eq!(parse(&encode(&m)).unwrap(), m);
        }
    }
}
