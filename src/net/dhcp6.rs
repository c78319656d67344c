//! A stateful DHCPv6 client (RFC 8415) for one interface: Solicit → Advertise → Request →
//! Reply (or Solicit → Reply with Rapid Commit) for one address in an IA_NA, Renew at T1,
//! Rebind at T2, and the DNS servers (option 23) and domain search list (option 24).
//!
//! The wire format is encoded and parsed by pure functions ([`encode`], [`parse`],
//! [`lease_from_reply`]); the exchanges run over a [`Transport`], a UDP socket on port 546
//! bound to the interface's link-local address in production ([`UdpTransport`]) and a scripted
//! server in the unit tests. [`run`] keeps the address for good, as a thread of the network
//! task (`init::network`).
//!
//! Choices and limits:
//! - The client is identified by a DUID-LL (type 3) made from the interface's MAC address: it
//!   needs no clock (a DUID-LLT's time would be 2000-01-01 on a node without an RTC) and no
//!   storage, and the same NIC gets the same DUID on every boot, so the server gives the same
//!   address back. The IAID is the MAC's last four bytes.
//! - Every message goes to All_DHCP_Relay_Agents_and_Servers (ff02::1:2) port 547 from the
//!   interface's link-local address; a server's Server Unicast option is not used (RFC 8415
//!   allows always multicasting). Before the first message the client waits (up to
//!   [`LINK_LOCAL_WAIT`]) for the link-local address to leave duplicate address detection:
//!   a tentative address cannot be bound.
//! - Retransmission as RFC 8415 section 15: the first timeout IRT plus up to ±10 % jitter
//!   (strictly positive for the first Solicit), doubled each time up to MRT; Solicits within
//!   [`Timing::budget`], at most [`REQ_MAX_RC`] Requests, Renews until T2, Rebinds until the
//!   address's valid lifetime ends. Advertises are collected for the whole first timeout and the
//!   one with the highest preference wins (preference 255 at once).
//! - The address is added with prefix length 128 (DHCPv6 says nothing about the on-link
//!   prefix) and its valid and preferred lifetimes, so the kernel deprecates and removes it on
//!   its own if renewal fails. [`bring_up`] waits (up to [`DAD_WAIT`]) for the address to pass
//!   duplicate address detection; one found in use is removed and declined. The on-link prefix and the default route come from router
//!   advertisements, handled by the kernel: [`prepare`] sets `accept_ra` to 2 on the
//!   interface, so RAs are taken even when forwarding is on (container networking turns it on).
//! - Not done: temporary addresses (IA_TA), prefix delegation (IA_PD), Confirm after a link
//!   change, Release on shutdown,
//!   Reconfigure, Information-Request (stateless DHCPv6), authentication. Strings (the search
//!   list) are kept only when they are plain host names, so a server cannot inject lines into
//!   resolv.conf; at most [`MAX_DNS`] servers and [`MAX_SEARCH`] domains are kept.

use std::fmt;
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use super::netlink::{Link, Rtnl};

pub const CLIENT_PORT: u16 = 546;
pub const SERVER_PORT: u16 = 547;
/// All_DHCP_Relay_Agents_and_Servers.
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

// Message types.
pub const SOLICIT: u8 = 1;
pub const ADVERTISE: u8 = 2;
pub const REQUEST: u8 = 3;
pub const RENEW: u8 = 5;
pub const REBIND: u8 = 6;
pub const REPLY: u8 = 7;
pub const DECLINE: u8 = 9;

// Option codes.
pub const OPT_CLIENTID: u16 = 1;
pub const OPT_SERVERID: u16 = 2;
pub const OPT_IA_NA: u16 = 3;
pub const OPT_IAADDR: u16 = 5;
pub const OPT_ORO: u16 = 6;
pub const OPT_PREFERENCE: u16 = 7;
pub const OPT_ELAPSED_TIME: u16 = 8;
pub const OPT_STATUS_CODE: u16 = 13;
pub const OPT_RAPID_COMMIT: u16 = 14;
pub const OPT_DNS_SERVERS: u16 = 23;
pub const OPT_DOMAIN_LIST: u16 = 24;

// Status codes.
pub const STATUS_SUCCESS: u16 = 0;
pub const STATUS_NO_ADDRS_AVAIL: u16 = 2;

/// A lifetime or T1/T2 of all ones means "forever".
pub const INFINITY: u32 = u32::MAX;

/// DNS servers kept from a reply (resolv.conf takes three in all).
pub const MAX_DNS: usize = 8;
/// Search domains kept from a reply (glibc before 2.26 read six).
pub const MAX_SEARCH: usize = 6;
/// The largest message we read; servers' replies are a few hundred bytes.
const MAX_MESSAGE: usize = 8192;
/// Requests per Request phase (RFC 8415 REQ_MAX_RC).
pub const REQ_MAX_RC: u32 = 10;
/// How long [`prepare`] waits for a usable link-local address (DAD takes about a second).
pub const LINK_LOCAL_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The wire format

/// A DHCPv6 message: type, 24-bit transaction id, options in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub xid: u32,
    pub options: Vec<(u16, Vec<u8>)>,
}

impl Message {
    pub fn option(&self, code: u16) -> Option<&[u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|(_, d)| d.as_slice())
    }

    fn all(&self, code: u16) -> impl Iterator<Item = &[u8]> {
        self.options.iter().filter(move |(c, _)| *c == code).map(|(_, d)| d.as_slice())
    }
}

/// Why bytes are not a usable DHCPv6 message or option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer than the 4 bytes of type and transaction id.
    Short(usize),
    /// An option's header or data runs past the end of its container.
    Truncated { code: u16, at: usize },
    /// An option's data has the wrong length for its code.
    BadLength { code: u16, len: usize },
    /// A domain name in option 24 is malformed.
    BadName(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Short(n) => write!(f, "{n} bytes is too short for a DHCPv6 message"),
            ParseError::Truncated { code, at } => write!(f, "option {code} at byte {at} runs past the end"),
            ParseError::BadLength { code, len } => write!(f, "option {code} has a bad length ({len} bytes)"),
            ParseError::BadName(why) => write!(f, "bad domain name in option 24: {why}"),
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn v6(b: &[u8]) -> Option<Ipv6Addr> {
    <[u8; 16]>::try_from(b).ok().map(Ipv6Addr::from)
}

/// Split a run of options (code, length, data): every length checked against what is left.
pub fn parse_options(b: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let (Some(code), Some(len)) = (be16(b, at), be16(b, at + 2)) else {
            return Err(ParseError::Truncated { code: be16(b, at).unwrap_or(0), at });
        };
        let data = b.get(at + 4..at + 4 + usize::from(len)).ok_or(ParseError::Truncated { code, at })?;
        out.push((code, data));
        at += 4 + usize::from(len);
    }
    Ok(out)
}

pub fn parse(b: &[u8]) -> Result<Message, ParseError> {
    if b.len() < 4 {
        return Err(ParseError::Short(b.len()));
    }
    let xid = u32::from_be_bytes([0, b[1], b[2], b[3]]);
    let options = parse_options(&b[4..])?.into_iter().map(|(c, d)| (c, d.to_vec())).collect();
    Ok(Message { kind: b[0], xid, options })
}

fn put_option(out: &mut Vec<u8>, code: u16, data: &[u8]) {
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = vec![m.kind];
    out.extend_from_slice(&m.xid.to_be_bytes()[1..]);
    for (code, data) in &m.options {
        put_option(&mut out, *code, data);
    }
    out
}

/// One address of an IA_NA (option 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IaAddr {
    pub address: Ipv6Addr,
    pub preferred: u32,
    pub valid: u32,
}

/// An IA_NA (option 3): its id, T1, T2, addresses and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IaNa {
    pub iaid: u32,
    pub t1: u32,
    pub t2: u32,
    pub addresses: Vec<IaAddr>,
    /// The IA's status code and message (None: success, by omission).
    pub status: Option<(u16, String)>,
}

/// A Status Code option's code and message (the message cleaned of control characters).
pub fn parse_status(data: &[u8]) -> Result<(u16, String), ParseError> {
    let code = be16(data, 0).ok_or(ParseError::BadLength { code: OPT_STATUS_CODE, len: data.len() })?;
    let text: String =
        String::from_utf8_lossy(&data[2..]).chars().filter(|c| !c.is_control()).take(200).collect();
    Ok((code, text))
}

/// Parse an IA_NA's data. Addresses whose preferred lifetime exceeds their valid lifetime are
/// left out (RFC 8415 18.2.10.1), as are addresses with a non-success status.
pub fn parse_ia_na(data: &[u8]) -> Result<IaNa, ParseError> {
    if data.len() < 12 {
        return Err(ParseError::BadLength { code: OPT_IA_NA, len: data.len() });
    }
    let (iaid, t1, t2) = (be32(data, 0).unwrap_or(0), be32(data, 4).unwrap_or(0), be32(data, 8).unwrap_or(0));
    let mut ia = IaNa { iaid, t1, t2, addresses: Vec::new(), status: None };
    for (code, d) in parse_options(&data[12..])? {
        match code {
            OPT_IAADDR => {
                if d.len() < 24 {
                    return Err(ParseError::BadLength { code, len: d.len() });
                }
                let a = IaAddr {
                    address: v6(&d[..16]).unwrap_or(Ipv6Addr::UNSPECIFIED),
                    preferred: be32(d, 16).unwrap_or(0),
                    valid: be32(d, 20).unwrap_or(0),
                };
                let mut ok = true;
                for (c, sd) in parse_options(&d[24..])? {
                    if c == OPT_STATUS_CODE {
                        ok &= parse_status(sd)?.0 == STATUS_SUCCESS;
                    }
                }
                if ok && a.preferred <= a.valid && ia.addresses.len() < 16 {
                    ia.addresses.push(a);
                }
            }
            OPT_STATUS_CODE => ia.status = Some(parse_status(d)?),
            _ => {}
        }
    }
    Ok(ia)
}

/// Parse option 24: a run of uncompressed DNS names (RFC 1035 3.1). Names that are not plain
/// host names are an error; at most [`MAX_SEARCH`] are kept.
pub fn parse_domain_list(data: &[u8]) -> Result<Vec<String>, ParseError> {
    let bad = |why: &str| ParseError::BadName(why.to_string());
    let mut names = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let mut labels: Vec<String> = Vec::new();
        loop {
            let len = usize::from(*data.get(at).ok_or_else(|| bad("a name does not end with a zero label"))?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return Err(bad("a label longer than 63 bytes (or a compression pointer)"));
            }
            let label = data.get(at..at + len).ok_or_else(|| bad("a label runs past the end"))?;
            labels.push(String::from_utf8_lossy(label).into_owned());
            at += len;
        }
        let name = labels.join(".");
        if name.is_empty() {
            continue;
        }
        let clean = super::dhcp::clean_name(&name).filter(|n| !n.contains(' '));
        let clean = clean.ok_or_else(|| bad(&format!("'{}' is not a host name", name.escape_debug())))?;
        if names.len() < MAX_SEARCH && !names.contains(&clean) {
            names.push(clean);
        }
    }
    Ok(names)
}

/// Option 23: a list of IPv6 addresses (at most [`MAX_DNS`] kept).
pub fn parse_dns(data: &[u8]) -> Result<Vec<Ipv6Addr>, ParseError> {
    if !data.len().is_multiple_of(16) {
        return Err(ParseError::BadLength { code: OPT_DNS_SERVERS, len: data.len() });
    }
    let mut out: Vec<Ipv6Addr> = Vec::new();
    for a in data.chunks_exact(16).filter_map(v6) {
        if out.len() < MAX_DNS && !out.contains(&a) && !a.is_unspecified() && !a.is_multicast() {
            out.push(a);
        }
    }
    Ok(out)
}

/// A DUID-LL (RFC 8415 11.4): type 3, hardware type 1 (Ethernet), the MAC.
pub fn duid_ll(mac: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&mac);
    d
}

/// The IAID of the one IA_NA: the MAC's last four bytes (stable across boots).
pub fn iaid_of(mac: [u8; 6]) -> u32 {
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

fn ia_na_option(iaid: u32, address: Option<IaAddr>) -> Vec<u8> {
    let mut d = iaid.to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 8]); // T1, T2: the server's choice
    if let Some(a) = address {
        let mut ad = a.address.octets().to_vec();
        ad.extend_from_slice(&a.preferred.to_be_bytes());
        ad.extend_from_slice(&a.valid.to_be_bytes());
        put_option(&mut d, OPT_IAADDR, &ad);
    }
    d
}

/// What every message carries: client id, elapsed time (hundredths of a second, at most
/// 0xffff), the options we ask for.
fn base(kind: u8, xid: u32, duid: &[u8], elapsed: Duration) -> Message {
    let hundredths = (elapsed.as_millis() / 10).min(0xffff) as u16;
    let mut oro = Vec::new();
    for code in [OPT_DNS_SERVERS, OPT_DOMAIN_LIST] {
        oro.extend_from_slice(&code.to_be_bytes());
    }
    Message {
        kind,
        xid,
        options: vec![
            (OPT_CLIENTID, duid.to_vec()),
            (OPT_ELAPSED_TIME, hundredths.to_be_bytes().to_vec()),
            (OPT_ORO, oro),
        ],
    }
}

pub fn solicit(xid: u32, duid: &[u8], iaid: u32, elapsed: Duration, rapid_commit: bool) -> Message {
    let mut m = base(SOLICIT, xid, duid, elapsed);
    m.options.push((OPT_IA_NA, ia_na_option(iaid, None)));
    if rapid_commit {
        m.options.push((OPT_RAPID_COMMIT, Vec::new()));
    }
    m
}

pub fn request(
    xid: u32,
    duid: &[u8],
    iaid: u32,
    server_id: &[u8],
    offered: IaAddr,
    elapsed: Duration,
) -> Message {
    let mut m = base(REQUEST, xid, duid, elapsed);
    m.options.insert(1, (OPT_SERVERID, server_id.to_vec()));
    m.options.push((OPT_IA_NA, ia_na_option(iaid, Some(offered))));
    m
}

/// A Decline of the lease's address (found in use by duplicate address detection).
pub fn decline(xid: u32, duid: &[u8], lease: &Lease, elapsed: Duration) -> Message {
    let mut m = renew(xid, duid, lease, false, elapsed);
    m.kind = DECLINE;
    m.options.retain(|(c, _)| *c != OPT_ORO);
    m
}

/// A Renew (to the lease's server) or, when `rebinding`, a Rebind (to any server).
pub fn renew(xid: u32, duid: &[u8], lease: &Lease, rebinding: bool, elapsed: Duration) -> Message {
    let mut m = base(if rebinding { REBIND } else { RENEW }, xid, duid, elapsed);
    if !rebinding {
        m.options.insert(1, (OPT_SERVERID, lease.server_id.clone()));
    }
    let held = IaAddr { address: lease.address, preferred: 0, valid: 0 };
    m.options.push((OPT_IA_NA, ia_na_option(lease.iaid, Some(held))));
    m
}

// ---------------------------------------------------------------------------------------------
// Leases

/// What a Reply granted: one address, its lifetimes and the IA's T1/T2 (seconds from
/// `obtained`; [`INFINITY`] is forever), the server, DNS servers and search list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv6Addr,
    pub preferred: u32,
    pub valid: u32,
    pub t1: u32,
    pub t2: u32,
    pub iaid: u32,
    pub server_id: Vec<u8>,
    /// Where the Reply came from (the server's or relay's link-local address).
    pub server: Ipv6Addr,
    pub dns: Vec<Ipv6Addr>,
    pub search: Vec<String>,
    /// When the exchange that granted it began (so every time here runs out a little early).
    pub obtained: Instant,
}

fn after(start: Instant, secs: u32) -> Option<Instant> {
    (secs != INFINITY).then(|| start + Duration::from_secs(u64::from(secs)))
}

impl Lease {
    pub fn renew_at(&self) -> Option<Instant> {
        after(self.obtained, self.t1)
    }
    pub fn rebind_at(&self) -> Option<Instant> {
        after(self.obtained, self.t2)
    }
    pub fn expires_at(&self) -> Option<Instant> {
        after(self.obtained, self.valid)
    }

    /// The lifetimes left at `now` (valid, preferred), for the kernel.
    pub fn lifetimes_at(&self, now: Instant) -> (u32, u32) {
        let left = |secs: u32| match after(self.obtained, secs) {
            None => INFINITY,
            Some(end) => end.saturating_duration_since(now).as_secs().min(u64::from(INFINITY - 1)) as u32,
        };
        (left(self.valid), left(self.preferred))
    }

    /// Whether anything resolv.conf or the interface shows differs from `other`.
    pub fn differs_in_config(&self, other: &Lease) -> bool {
        (self.address, &self.dns, &self.search) != (other.address, &other.dns, &other.search)
    }
}

/// Why a Reply (or Advertise) gives us no lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Unusable: not for us, malformed, no address. Keep listening.
    Ignore(String),
    /// The server said no with a status code (top level or in our IA).
    Status(u16, String),
}

/// Build a lease from a Reply (or, to see what is offered, an Advertise), checking it is for
/// us (`duid`, `iaid`) and names its server.
pub fn lease_from_reply(
    m: &Message,
    duid: &[u8],
    iaid: u32,
    from: Ipv6Addr,
    obtained: Instant,
) -> Result<Lease, Refusal> {
    let ignore = |why: String| Err(Refusal::Ignore(why));
    if m.option(OPT_CLIENTID) != Some(duid) {
        return ignore("its client id is not ours".into());
    }
    let Some(server_id) = m.option(OPT_SERVERID).filter(|s| !s.is_empty() && s.len() <= 130) else {
        return ignore("it has no usable server id".into());
    };
    if let Some(data) = m.option(OPT_STATUS_CODE) {
        let (code, text) = parse_status(data).map_err(|e| Refusal::Ignore(e.to_string()))?;
        if code != STATUS_SUCCESS {
            return Err(Refusal::Status(code, text));
        }
    }
    let mut ours = None;
    for data in m.all(OPT_IA_NA) {
        let ia = parse_ia_na(data).map_err(|e| Refusal::Ignore(e.to_string()))?;
        if ia.iaid == iaid {
            ours = Some(ia);
            break;
        }
    }
    let Some(ia) = ours else { return ignore("it has no IA_NA for our IAID".into()) };
    if let Some((code, text)) = ia.status.clone().filter(|(c, _)| *c != STATUS_SUCCESS) {
        return Err(Refusal::Status(code, text));
    }
    let Some(a) = ia.addresses.iter().copied().find(|a| a.valid > 0 && is_global_unicast(a.address)) else {
        return Err(Refusal::Status(STATUS_NO_ADDRS_AVAIL, "the IA_NA holds no usable address".into()));
    };
    // T1/T2 of 0 leave the times to us: half and 0.8 of the preferred lifetime (RFC 8415 21.4).
    let share = |num: u64| {
        if a.preferred == INFINITY {
            INFINITY
        } else {
            (u64::from(a.preferred) * num / 10) as u32
        }
    };
    let (mut t1, mut t2) = (ia.t1, ia.t2);
    if t1 > t2 && t2 != 0 {
        return ignore(format!("T1 {t1} is after T2 {t2}"));
    }
    if t2 == 0 {
        t2 = share(8);
    }
    if t1 == 0 {
        t1 = share(5).min(t2);
    }
    let unusable = |e: ParseError| Refusal::Ignore(e.to_string());
    let dns = m.option(OPT_DNS_SERVERS).map(parse_dns).transpose().map_err(unusable)?;
    let search = m.option(OPT_DOMAIN_LIST).map(parse_domain_list).transpose().map_err(unusable)?;
    Ok(Lease {
        address: a.address,
        preferred: a.preferred,
        valid: a.valid,
        t1: t1.min(a.valid),
        t2: t2.min(a.valid),
        iaid,
        server_id: server_id.to_vec(),
        server: from,
        dns: dns.unwrap_or_default(),
        search: search.unwrap_or_default(),
        obtained,
    })
}

/// An address that can be an interface's global address (not ::, loopback, multicast or
/// link-local).
fn is_global_unicast(a: Ipv6Addr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80)
}

/// The Preference option's value (0 without one).
fn preference(m: &Message) -> u8 {
    m.option(OPT_PREFERENCE).and_then(|d| (d.len() == 1).then(|| d[0])).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Retransmission (RFC 8415 section 15)

/// A phase's retransmission parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Initial retransmission time.
    pub irt: Duration,
    /// Maximum retransmission time.
    pub mrt: Duration,
}

pub const SOLICIT_BACKOFF: Backoff = Backoff { irt: Duration::from_secs(1), mrt: Duration::from_secs(3600) };
pub const REQUEST_BACKOFF: Backoff = Backoff { irt: Duration::from_secs(1), mrt: Duration::from_secs(30) };
pub const DECLINE_BACKOFF: Backoff = Backoff { irt: Duration::from_secs(1), mrt: Duration::ZERO };
/// Declines per address (RFC 8415 DEC_MAX_RC).
pub const DEC_MAX_RC: u32 = 4;
pub const RENEW_BACKOFF: Backoff = Backoff { irt: Duration::from_secs(10), mrt: Duration::from_secs(600) };

/// A random factor in [-0.1, 0.1] (or (0, 0.1] when `positive`), from std's keyed hasher.
fn rand_factor(positive: bool) -> f64 {
    let r = f64::from(super::dhcp::new_xid() % 10_001) / 100_000.0; // 0 ..= 0.1
    if positive {
        r.max(0.001)
    } else {
        r * 2.0 - 0.1
    }
}

/// The next retransmission timeout after `prev` (None: the first), with random factor `rand`.
pub fn next_timeout(b: Backoff, prev: Option<Duration>, rand: f64) -> Duration {
    let rt = match prev {
        None => b.irt.mul_f64(1.0 + rand),
        Some(p) => p.mul_f64(2.0 + rand),
    };
    if b.mrt != Duration::ZERO && rt > b.mrt {
        b.mrt.mul_f64(1.0 + rand)
    } else {
        rt
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub enum Error {
    /// Setting up the interface (netlink) failed.
    Link(super::Error),
    /// IPv6 is off on the interface (`disable_ipv6`).
    Disabled { interface: String },
    /// The interface has no link-local address past duplicate address detection.
    NoLinkLocal { interface: String, waited: Duration, dad_failed: bool },
    /// The UDP socket could not be opened or read.
    Socket { interface: String, cause: io::Error },
    /// No server answered in time.
    Timeout { interface: String, phase: &'static str, tries: u32, waited: Duration },
    /// Duplicate address detection found the leased address in use (it was declined).
    DuplicateAddress { interface: String, address: Ipv6Addr },
    /// The server refused with a status code, again and again.
    Refused { interface: String, status: u16, message: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Link(e) => write!(f, "dhcp6: {e}"),
            Error::Disabled { interface } => {
                write!(f, "dhcp6: IPv6 is disabled on {interface} (net.ipv6.conf.{interface}.disable_ipv6)")
            }
            Error::NoLinkLocal { interface, waited, dad_failed: true } => write!(
                f,
                "dhcp6: {interface}: duplicate address detection failed for its link-local address \
                 (another node has the same MAC?); waited {waited:?}"
            ),
            Error::NoLinkLocal { interface, waited, dad_failed: false } => write!(
                f,
                "dhcp6: {interface} has no usable link-local address after {waited:?} (no carrier?)"
            ),
            Error::Socket { interface, cause } => write!(f, "dhcp6: {interface}: DHCPv6 socket: {cause}"),
            Error::Timeout { interface, phase, tries, waited } => write!(
                f,
                "dhcp6: {interface}: no answer to {phase} ({tries} tries over {:.1}s); is there a \
                 DHCPv6 server on the link?",
                waited.as_secs_f64()
            ),
            Error::DuplicateAddress { interface, address } => {
                write!(f, "dhcp6: {interface}: another node already uses the leased {address}; declined it")
            }
            Error::Refused { interface, status, message } => {
                write!(f, "dhcp6: {interface}: the server refused an address (status {status}: {message})")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<super::Error> for Error {
    fn from(e: super::Error) -> Error {
        Error::Link(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Exchanges

/// Where DHCPv6 messages go (always to ff02::1:2 on the interface) and come from.
pub trait Transport {
    fn send(&mut self, packet: &[u8]) -> io::Result<()>;
    /// Wait up to `timeout` for one datagram and its sender; `Ok(None)` when none came.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<(Vec<u8>, Ipv6Addr)>>;
}

/// The real transport: UDP port 546 on the interface's link-local address.
pub struct UdpTransport {
    sock: UdpSocket,
    to: SocketAddrV6,
    buf: Vec<u8>,
}

impl UdpTransport {
    pub fn open(link_local: Ipv6Addr, index: u32) -> io::Result<UdpTransport> {
        let sock = UdpSocket::bind(SocketAddrV6::new(link_local, CLIENT_PORT, 0, index))?;
        let to = SocketAddrV6::new(ALL_SERVERS, SERVER_PORT, 0, index);
        Ok(UdpTransport { sock, to, buf: vec![0; MAX_MESSAGE] })
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        self.sock.send_to(packet, self.to).map(drop)
    }

    fn recv(&mut self, timeout: Duration) -> io::Result<Option<(Vec<u8>, Ipv6Addr)>> {
        self.sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.sock.recv_from(&mut self.buf) {
            Ok((n, from)) => {
                let from = match from {
                    std::net::SocketAddr::V6(a) => *a.ip(),
                    std::net::SocketAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
                };
                Ok(Some((self.buf[..n].to_vec(), from)))
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some((Vec::new(), Ipv6Addr::UNSPECIFIED))),
            Err(e) => Err(e),
        }
    }
}

/// How acquisition is bounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The whole acquisition, restarts after a refusal included.
    pub budget: Duration,
    /// Ask for Rapid Commit (a Reply straight to the Solicit).
    pub rapid_commit: bool,
    /// Scale every retransmission time (1.0 in production; the unit tests shrink them).
    pub scale: f64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing { budget: Duration::from_secs(30), rapid_commit: true, scale: 1.0 }
    }
}

/// What a Renew or Rebind came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The server extended the binding (or gave another address).
    Renewed(Lease),
    /// The server no longer binds our address (status, or lifetimes of 0).
    Lost(String),
    /// No answer before the deadline.
    NoAnswer,
}

/// Refusals in a row after which acquisition gives up.
const MAX_REFUSALS: u32 = 3;

/// A DHCPv6 client for one interface.
pub struct Client<T: Transport> {
    transport: T,
    interface: String,
    duid: Vec<u8>,
    iaid: u32,
    timing: Timing,
}

/// A fresh 24-bit transaction id.
fn new_xid() -> u32 {
    super::dhcp::new_xid() & 0x00ff_ffff
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T, interface: &str, mac: [u8; 6], timing: Timing) -> Client<T> {
        Client { transport, interface: interface.to_string(), duid: duid_ll(mac), iaid: iaid_of(mac), timing }
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.timing.scale)
    }

    /// Listen until `until` for messages of transaction `xid` from a server; `take` returns
    /// Some to stop listening.
    fn listen<R>(
        &mut self,
        xid: u32,
        until: Instant,
        take: &mut dyn FnMut(&Message, Ipv6Addr) -> Option<R>,
    ) -> Result<Option<R>, Error> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let got = self
                .transport
                .recv(left)
                .map_err(|cause| Error::Socket { interface: self.interface.clone(), cause })?;
            let Some((bytes, from)) = got else { return Ok(None) };
            let m = match parse(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    if !bytes.is_empty() {
                        log::debug!("dhcp6: {}: ignoring a message from {from}: {e}", self.interface);
                    }
                    continue;
                }
            };
            if m.xid != xid || !matches!(m.kind, ADVERTISE | REPLY) {
                continue;
            }
            if let Some(r) = take(&m, from) {
                return Ok(Some(r));
            }
        }
    }

    fn send(&mut self, packet: &[u8]) {
        if let Err(e) = self.transport.send(packet) {
            log::warn!("dhcp6: {}: sending to {ALL_SERVERS} failed: {e}", self.interface);
        }
    }

    /// Solicit until an Advertise (the best of the first timeout's) or a rapid-commit Reply.
    fn solicit(
        &mut self,
        started: Instant,
        deadline: Instant,
    ) -> Result<Result<Lease, (Vec<u8>, IaAddr)>, Error> {
        let xid = new_xid();
        let (duid, iaid) = (self.duid.clone(), self.iaid);
        let mut rt = None;
        let mut tries = 0;
        let mut best: Option<(u8, Vec<u8>, IaAddr)> = None;
        let phase_start = Instant::now();
        while Instant::now() < deadline {
            let next = next_timeout(SOLICIT_BACKOFF, rt, rand_factor(rt.is_none()));
            rt = Some(next);
            tries += 1;
            let sent_at = Instant::now();
            let packet = encode(&solicit(xid, &duid, iaid, sent_at - started, self.timing.rapid_commit));
            self.send(&packet);
            let until = (sent_at + self.scaled(next)).min(deadline);
            let interface = self.interface.clone();
            let rapid = self.timing.rapid_commit;
            let got = self.listen(xid, until, &mut |m, from| {
                let offer = lease_from_reply(m, &duid, iaid, from, sent_at);
                match (m.kind, offer) {
                    (REPLY, Ok(lease)) if rapid && m.option(OPT_RAPID_COMMIT).is_some() => Some(Ok(lease)),
                    (ADVERTISE, Ok(lease)) => {
                        let pref = preference(m);
                        let offered =
                            IaAddr { address: lease.address, preferred: lease.preferred, valid: lease.valid };
                        log::info!(
                            "dhcp6: {interface}: {from} advertises {} (preference {pref})",
                            lease.address
                        );
                        if best.as_ref().is_none_or(|(p, _, _)| pref > *p) {
                            best = Some((pref, lease.server_id, offered));
                        }
                        (pref == 255).then_some(Err(()))
                    }
                    (_, Err(Refusal::Status(code, text))) => {
                        log::info!("dhcp6: {interface}: {from} has nothing for us (status {code}: {text})");
                        None
                    }
                    (_, Err(Refusal::Ignore(why))) => {
                        log::debug!("dhcp6: {interface}: ignoring a message from {from}: {why}");
                        None
                    }
                    _ => None,
                }
            })?;
            match got {
                Some(Ok(lease)) => return Ok(Ok(lease)),
                Some(Err(())) | None => {
                    if let Some((_, server_id, offered)) = best.take() {
                        return Ok(Err((server_id, offered)));
                    }
                }
            }
        }
        Err(Error::Timeout {
            interface: self.interface.clone(),
            phase: "Solicit",
            tries,
            waited: phase_start.elapsed(),
        })
    }

    /// Request the advertised address until a Reply (REQ_MAX_RC tries, within `deadline`).
    fn request(
        &mut self,
        started: Instant,
        deadline: Instant,
        server_id: &[u8],
        offered: IaAddr,
    ) -> Result<Result<Lease, Refusal>, Error> {
        let xid = new_xid();
        let (duid, iaid) = (self.duid.clone(), self.iaid);
        let mut rt = None;
        let mut tries = 0;
        let phase_start = Instant::now();
        while tries < REQ_MAX_RC && Instant::now() < deadline {
            let next = next_timeout(REQUEST_BACKOFF, rt, rand_factor(false));
            rt = Some(next);
            tries += 1;
            let sent_at = Instant::now();
            self.send(&encode(&request(xid, &duid, iaid, server_id, offered, sent_at - started)));
            let until = (sent_at + self.scaled(next)).min(deadline);
            let got = self.listen(xid, until, &mut |m, from| {
                if m.kind != REPLY || m.option(OPT_SERVERID) != Some(server_id) {
                    return None;
                }
                match lease_from_reply(m, &duid, iaid, from, sent_at) {
                    Err(Refusal::Ignore(_)) => None,
                    other => Some(other),
                }
            })?;
            if let Some(answer) = got {
                return Ok(answer);
            }
        }
        Err(Error::Timeout {
            interface: self.interface.clone(),
            phase: "Request",
            tries,
            waited: phase_start.elapsed(),
        })
    }

    /// Solicit, Request, Reply: get an address within the budget, starting over when the
    /// server refuses (at most [`MAX_REFUSALS`] times).
    pub fn acquire(&mut self) -> Result<Lease, Error> {
        let started = Instant::now();
        let deadline = started + self.timing.budget;
        let mut refusals = 0;
        loop {
            let (server_id, offered) = match self.solicit(started, deadline)? {
                Ok(lease) => return Ok(lease),
                Err(advertised) => advertised,
            };
            match self.request(started, deadline, &server_id, offered)? {
                Ok(lease) => return Ok(lease),
                Err(Refusal::Status(status, message)) => {
                    refusals += 1;
                    log::warn!(
                        "dhcp6: {}: the server refused {}: {status} {message}",
                        self.interface,
                        offered.address
                    );
                    if refusals >= MAX_REFUSALS || Instant::now() >= deadline {
                        return Err(Error::Refused { interface: self.interface.clone(), status, message });
                    }
                }
                Err(Refusal::Ignore(_)) => unreachable!("request() returns only answers"),
            }
        }
    }

    /// Tell the server the lease's address is in use by another node: Decline until a Reply
    /// (RFC 8415 18.2.8: first timeout 1 s, at most [`DEC_MAX_RC`] transmissions).
    pub fn decline(&mut self, lease: &Lease) -> Result<(), Error> {
        let xid = new_xid();
        let started = Instant::now();
        let mut rt = None;
        for _ in 0..DEC_MAX_RC {
            let next = next_timeout(DECLINE_BACKOFF, rt, rand_factor(false));
            rt = Some(next);
            let sent_at = Instant::now();
            self.send(&encode(&decline(xid, &self.duid, lease, sent_at - started)));
            let server_id = lease.server_id.clone();
            let until = sent_at + self.scaled(next);
            let answered = self.listen(xid, until, &mut |m, _| {
                (m.kind == REPLY && m.option(OPT_SERVERID) == Some(server_id.as_slice())).then_some(())
            })?;
            if answered.is_some() {
                return Ok(());
            }
        }
        log::warn!("dhcp6: {}: no answer to the Decline of {}", self.interface, lease.address);
        Ok(())
    }

    /// Renew (or, when `rebinding`, Rebind) `lease`, retransmitting with RFC backoff until an
    /// answer or `until` (T2 for a Renew, the end of the valid lifetime for a Rebind).
    pub fn renew(&mut self, lease: &Lease, rebinding: bool, until: Instant) -> Result<Renewal, Error> {
        let xid = new_xid();
        let started = Instant::now();
        let (duid, iaid) = (self.duid.clone(), self.iaid);
        let mut rt = None;
        while Instant::now() < until {
            let next = next_timeout(RENEW_BACKOFF, rt, rand_factor(false));
            rt = Some(next);
            let sent_at = Instant::now();
            self.send(&encode(&renew(xid, &duid, lease, rebinding, sent_at - started)));
            let listen_until = (sent_at + self.scaled(next)).min(until);
            let server_id = lease.server_id.clone();
            let got = self.listen(xid, listen_until, &mut |m, from| {
                if m.kind != REPLY || (!rebinding && m.option(OPT_SERVERID) != Some(server_id.as_slice())) {
                    return None;
                }
                match lease_from_reply(m, &duid, iaid, from, sent_at) {
                    Ok(new) => Some(Renewal::Renewed(new)),
                    Err(Refusal::Status(code, text)) => Some(Renewal::Lost(format!("status {code}: {text}"))),
                    Err(Refusal::Ignore(_)) => None,
                }
            })?;
            if let Some(r) = got {
                return Ok(r);
            }
        }
        Ok(Renewal::NoAnswer)
    }
}

// ---------------------------------------------------------------------------------------------
// The interface

/// Set `name` up for DHCPv6: the link up, IPv6 on, `accept_ra` 2 (router advertisements give
/// the default route and on-link prefix, even with forwarding on), then wait for a usable
/// link-local address. Returns the link and that address.
pub fn prepare(name: &str) -> Result<(Link, Ipv6Addr), Error> {
    let mut nl = Rtnl::open()?;
    let link = nl
        .links()?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| super::Error::NoInterface { wanted: Some(name.to_string()), available: Vec::new() })?;
    let conf = format!("/proc/sys/net/ipv6/conf/{name}");
    match std::fs::read_to_string(format!("{conf}/disable_ipv6")) {
        Ok(v) if v.trim() == "0" => {}
        Ok(_) => return Err(Error::Disabled { interface: name.to_string() }),
        // No such directory: a kernel without IPv6, or the link just vanished.
        Err(_) => return Err(Error::Disabled { interface: name.to_string() }),
    }
    if let Err(e) = std::fs::write(format!("{conf}/accept_ra"), "2") {
        log::warn!("dhcp6: {name}: cannot set accept_ra to 2 ({e}); IPv6 routes depend on it");
    }
    nl.set_up(&link)?;
    let start = Instant::now();
    loop {
        let addrs = nl.addrs6(Some(link.index))?;
        if let Some(ll) = addrs.iter().find(|a| a.is_usable_link_local()) {
            return Ok((link, ll.address));
        }
        if start.elapsed() >= LINK_LOCAL_WAIT {
            let dad_failed = addrs.iter().any(|a| a.flags & super::netlink::IFA_F_DADFAILED != 0);
            return Err(Error::NoLinkLocal {
                interface: name.to_string(),
                waited: start.elapsed(),
                dad_failed,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client on `link` over its link-local address.
pub fn client(link: &Link, link_local: Ipv6Addr) -> Result<Client<UdpTransport>, Error> {
    let mac = link.mac.ok_or_else(|| super::Error::Invalid {
        interface: link.name.clone(),
        reason: "it has no MAC address, so DHCPv6 cannot identify it".to_string(),
    })?;
    let transport = UdpTransport::open(link_local, link.index)
        .map_err(|cause| Error::Socket { interface: link.name.clone(), cause })?;
    Ok(Client::new(transport, &link.name, mac, Timing::default()))
}

/// Put the lease's address on the link (prefix /128) with the lifetimes it has left.
pub fn apply(link: &Link, lease: &Lease) -> Result<(), Error> {
    let (valid, preferred) = lease.lifetimes_at(Instant::now());
    Rtnl::open()?.add_addr6_lifetimes(link, lease.address, 128, valid, preferred)?;
    Ok(())
}

/// Prepare the interface and acquire a lease, and apply it.
pub fn bring_up(name: &str) -> Result<(Link, Lease), Error> {
    let (link, ll) = prepare(name)?;
    let mut c = client(&link, ll)?;
    let lease = c.acquire()?;
    apply(&link, &lease)?;
    if let Err(e) = wait_for_dad(&link, lease.address) {
        let _ = Rtnl::open().and_then(|mut nl| nl.del_addr6_if_present(&link, lease.address, 128));
        if matches!(e, Error::DuplicateAddress { .. }) {
            c.decline(&lease)?;
        }
        return Err(e);
    }
    log::info!(
        "dhcp6: {name} has {}/128 from {} (valid {}s, preferred {}s, T1 {}s, DNS {:?})",
        lease.address,
        lease.server,
        lease.valid,
        lease.preferred,
        lease.t1,
        lease.dns
    );
    Ok((link, lease))
}

/// How long [`bring_up`] waits for the leased address to pass duplicate address detection
/// (one probe, a second, after a random delay of up to a second, by default).
pub const DAD_WAIT: Duration = Duration::from_secs(5);

/// Wait for `address` on `link` to leave duplicate address detection: Ok when it is usable,
/// [`Error::DuplicateAddress`] when another node has it.
pub fn wait_for_dad(link: &Link, address: Ipv6Addr) -> Result<(), Error> {
    use super::netlink::{IFA_F_DADFAILED, IFA_F_TENTATIVE};
    let mut nl = Rtnl::open()?;
    let start = Instant::now();
    loop {
        let flags = nl.addrs6(Some(link.index))?.iter().find(|a| a.address == address).map(|a| a.flags);
        match flags {
            Some(f) if f & IFA_F_DADFAILED != 0 => {
                return Err(Error::DuplicateAddress { interface: link.name.clone(), address })
            }
            Some(f) if f & IFA_F_TENTATIVE == 0 => return Ok(()),
            None => return Err(Error::DuplicateAddress { interface: link.name.clone(), address }),
            Some(_) if start.elapsed() >= DAD_WAIT => {
                log::warn!("dhcp6: {}: {address} is still tentative after {DAD_WAIT:?}", link.name);
                return Ok(());
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Pause between acquisitions after the address is lost or acquisition failed.
const REACQUIRE_PAUSE: Duration = Duration::from_secs(30);

/// Where a lease stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing to do until the given time (None: forever).
    Bound(Option<Instant>),
    /// Past T1: Renew until the given time (T2, or the end of the lease).
    Renewing(Instant),
    /// Past T2: Rebind until the end of the lease (None: forever).
    Rebinding(Option<Instant>),
    Expired,
}

pub fn state_at(lease: &Lease, now: Instant) -> State {
    let end = lease.expires_at();
    if end.is_some_and(|e| now >= e) {
        return State::Expired;
    }
    match (lease.renew_at(), lease.rebind_at()) {
        (Some(t1), _) if now < t1 => State::Bound(Some(t1)),
        (None, None) => State::Bound(end),
        (Some(_), Some(t2)) if now < t2 => State::Renewing(t2),
        (Some(_), None) => State::Renewing(end.unwrap_or(now + Duration::from_secs(86400))),
        _ => State::Rebinding(end),
    }
}

/// Keep an address on `name` for good: acquire (every [`REACQUIRE_PAUSE`] until it works),
/// renew at T1, rebind at T2, start over when the binding is lost. `first` is called once
/// with the first acquisition's outcome; `on_change` with the lease whenever the address, DNS
/// servers or search list change, and with None when the address is lost.
pub fn run(
    name: &str,
    first: impl FnOnce(Result<&Lease, String>),
    mut on_change: impl FnMut(Option<&Lease>),
) -> ! {
    let mut first = Some(first);
    let mut current: Option<(Link, Lease)> = None;
    loop {
        let Some((link, lease)) = current.take() else {
            match bring_up(name) {
                Ok((link, lease)) => {
                    if let Some(f) = first.take() {
                        f(Ok(&lease));
                    }
                    on_change(Some(&lease));
                    current = Some((link, lease));
                }
                Err(e) => {
                    log::warn!("{e}; retrying in {REACQUIRE_PAUSE:?}");
                    if let Some(f) = first.take() {
                        f(Err(e.to_string()));
                    }
                    std::thread::sleep(REACQUIRE_PAUSE);
                }
            }
            continue;
        };
        let now = Instant::now();
        let (rebinding, until) = match state_at(&lease, now) {
            State::Bound(t) => {
                let wait = t.map_or(Duration::from_secs(86400), |t| t.saturating_duration_since(now));
                std::thread::sleep(wait.min(Duration::from_secs(86400)));
                current = Some((link, lease));
                continue;
            }
            State::Renewing(t2) => (false, t2),
            State::Rebinding(end) => (true, end.unwrap_or(now + Duration::from_secs(86400))),
            State::Expired => {
                log::warn!("dhcp6: {name}: the binding of {} ran out", lease.address);
                let _ = Rtnl::open().and_then(|mut nl| nl.del_addr6_if_present(&link, lease.address, 128));
                on_change(None);
                continue;
            }
        };
        let answer = prepare(name).and_then(|(link, ll)| client(&link, ll)?.renew(&lease, rebinding, until));
        match answer {
            Ok(Renewal::Renewed(new)) => {
                if new.address != lease.address {
                    let _ =
                        Rtnl::open().and_then(|mut nl| nl.del_addr6_if_present(&link, lease.address, 128));
                }
                if let Err(e) = apply(&link, &new) {
                    log::warn!("{e}");
                }
                log::info!("dhcp6: {name}: renewed {} (valid {}s)", new.address, new.valid);
                if new.differs_in_config(&lease) {
                    on_change(Some(&new));
                }
                current = Some((link, new));
            }
            Ok(Renewal::Lost(why)) => {
                log::warn!("dhcp6: {name}: the server no longer binds {}: {why}", lease.address);
                let _ = Rtnl::open().and_then(|mut nl| nl.del_addr6_if_present(&link, lease.address, 128));
                on_change(None);
            }
            Ok(Renewal::NoAnswer) => current = Some((link, lease)),
            Err(e) => {
                log::warn!("{e}");
                std::thread::sleep(Duration::from_secs(10));
                current = Some((link, lease));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// resolv.conf

/// `base` (the resolv.conf text of the IPv4 configuration; may be empty) with the lease's DNS
/// servers and search domains added: IPv4 and IPv6 servers alternate, so that either family
/// alone still finds one among the three the C libraries read; search domains from both, the
/// IPv4 ones first, without duplicates, at most [`MAX_SEARCH`]. Link-local servers are written
/// with the interface as scope id (`fe80::1%eth0`), which glibc and musl both accept.
pub fn resolv_conf(base: &str, interface: &str, lease: &Lease) -> String {
    let mut comments = Vec::new();
    let mut search: Vec<String> = Vec::new();
    let mut v4: Vec<String> = Vec::new();
    for line in base.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") => search.extend(words.map(str::to_string)),
            Some("nameserver") => v4.extend(words.next().map(str::to_string)),
            _ if line.starts_with('#') && !line.contains("no name servers") => {
                comments.push(line.to_string())
            }
            _ => {}
        }
    }
    for d in &lease.search {
        if !search.contains(d) {
            search.push(d.clone());
        }
    }
    search.truncate(MAX_SEARCH);
    let v6: Vec<String> = lease
        .dns
        .iter()
        .map(
            |a| if (a.segments()[0] & 0xffc0) == 0xfe80 { format!("{a}%{interface}") } else { a.to_string() },
        )
        .collect();
    let mut servers = Vec::new();
    for i in 0..v4.len().max(v6.len()) {
        servers.extend(v4.get(i).cloned());
        servers.extend(v6.get(i).cloned());
    }
    let mut out = comments.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "# Written by berth from the DHCPv6 lease of {interface} (server {})\n",
        lease.server
    ));
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if servers.is_empty() {
        out.push_str("# no name servers are known\n");
    }
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    out
}

#[cfg(test)]
mod netns_test;
#[cfg(test)]
mod tests;
