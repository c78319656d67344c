//! SNTP client mode (RFC 4330, the client side of RFC 5905): the 48-byte packet, the checks
//! an answer must pass, the offset and delay it gives, and one request/answer exchange over UDP.
//!
//! A request carries a random 64-bit nonce in its transmit timestamp (as chrony does), not the
//! local time: the server copies it into the answer's origin timestamp, and an answer that does
//! not carry it is not ours (spoofed, or a late duplicate) and is ignored while we keep
//! waiting. Only then are the answer's own fields judged, so a forged kiss-o'-death cannot shut
//! a server off. The local send and receive times are one realtime reading at the send plus
//! the monotonic time that passed, so a clock step elsewhere cannot distort the delay.
//!
//! An answer is refused unless it is mode 4 (server), version 3 or 4, stratum 1–15 (stratum 0
//! is a kiss-o'-death, 16 unsynchronised), its leap indicator is not 3 (alarm: the server's
//! clock is not synchronised), its receive and transmit timestamps are set and in order, its
//! root delay and root dispersion are each below 16 s (RFC 5905's MAXDISP) and its root
//! distance (root delay / 2 + root dispersion + our round trip / 2) is at most 1.5 s (ntpd's
//! MAXDIST), the round trip is not negative, and the server's time is not before the floor
//! the caller gives (the image's build time).
//!
//! Timestamps are 32-bit seconds since 1900 plus a 32-bit fraction; the era is chosen as RFC
//! 4330 §3 says (top bit set: 1968–2036, clear: 2036–2104), which is right until 2104.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The NTP header, without extension fields or MAC.
pub const PACKET_LEN: usize = 48;
pub const NTP_PORT: u16 = 123;
/// Seconds from 1900-01-01 (NTP's epoch) to 1970-01-01.
const UNIX_FROM_NTP: i64 = 2_208_988_800;
const NS: i64 = 1_000_000_000;
/// RFC 5905's MAXDISP: root delay or dispersion at or above this is nonsense.
const MAX_ROOT: i64 = 16 * NS;
/// The largest root distance accepted (ntpd's MAXDIST).
pub const MAX_DISTANCE_NS: i64 = 1_500_000_000;
/// How much of an answer is read: the header plus room for extension fields we never ask for.
const RECV_BUF: usize = 1024;
/// Reasons for ignored packets kept for the error message.
const MAX_IGNORED_NOTES: usize = 4;

/// An NTP timestamp: seconds since 1900 (mod 2^32) in the high 32 bits, fraction in the low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NtpTime(pub u64);

impl NtpTime {
    /// (A client never sends its time: only the tests' server needs this.)
    #[cfg(test)]
    pub fn from_unix_ns(ns: i64) -> NtpTime {
        let secs = ns.div_euclid(NS) + UNIX_FROM_NTP;
        let sub = ns.rem_euclid(NS) as u64;
        // Round to the nearest 2^-32 s.
        let frac = ((sub << 32) + (NS as u64 / 2)) / NS as u64;
        let (secs, frac) = if frac >> 32 != 0 { (secs + 1, 0) } else { (secs, frac) };
        NtpTime(((secs as u64 & 0xffff_ffff) << 32) | frac)
    }

    pub fn to_unix_ns(self) -> i64 {
        let secs = (self.0 >> 32) as i64;
        // RFC 4330 §3: with the top bit clear the time is in era 1 (from 2036-02-07).
        let secs = if secs & 0x8000_0000 != 0 { secs } else { secs + (1 << 32) };
        let frac = self.0 & 0xffff_ffff;
        (secs - UNIX_FROM_NTP) * NS + ((frac * NS as u64) >> 32) as i64
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// NTP's 16.16 fixed-point "short format" (root delay, root dispersion) in nanoseconds.
fn short_to_ns(v: u32) -> i64 {
    ((v as u64 * NS as u64) >> 16) as i64
}

#[cfg(test)]
fn ns_to_short(ns: i64) -> u32 {
    ((ns.max(0) as u64) << 16).div_ceil(NS as u64).min(u32::MAX as u64) as u32
}

/// One NTP packet's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Packet {
    pub leap: u8,
    pub version: u8,
    pub mode: u8,
    pub stratum: u8,
    pub poll: i8,
    pub precision: i8,
    /// 16.16 seconds.
    pub root_delay: u32,
    /// 16.16 seconds.
    pub root_dispersion: u32,
    /// The reference id; in a kiss-o'-death (stratum 0) the four ASCII letters of the code.
    pub reference_id: [u8; 4],
    pub reference: NtpTime,
    pub origin: NtpTime,
    pub receive: NtpTime,
    pub transmit: NtpTime,
}

pub const MODE_CLIENT: u8 = 3;
pub const MODE_SERVER: u8 = 4;
pub const LEAP_UNSYNCHRONISED: u8 = 3;

impl Packet {
    /// A client request (version 4) carrying `nonce` as its transmit timestamp.
    pub fn request(nonce: NtpTime) -> Packet {
        Packet { version: 4, mode: MODE_CLIENT, transmit: nonce, ..Default::default() }
    }

    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (self.leap & 3) << 6 | (self.version & 7) << 3 | (self.mode & 7);
        b[1] = self.stratum;
        b[2] = self.poll as u8;
        b[3] = self.precision as u8;
        b[4..8].copy_from_slice(&self.root_delay.to_be_bytes());
        b[8..12].copy_from_slice(&self.root_dispersion.to_be_bytes());
        b[12..16].copy_from_slice(&self.reference_id);
        for (i, t) in [self.reference, self.origin, self.receive, self.transmit].iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&t.0.to_be_bytes());
        }
        b
    }

    /// The header of `b`; bytes past it (extension fields, MAC) are not looked at.
    pub fn decode(b: &[u8]) -> Result<Packet, Refusal> {
        if b.len() < PACKET_LEN {
            return Err(Refusal::Short(b.len()));
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let t_at = |i: usize| NtpTime(u64::from(u32_at(i)) << 32 | u64::from(u32_at(i + 4)));
        Ok(Packet {
            leap: b[0] >> 6,
            version: (b[0] >> 3) & 7,
            mode: b[0] & 7,
            stratum: b[1],
            poll: b[2] as i8,
            precision: b[3] as i8,
            root_delay: u32_at(4),
            root_dispersion: u32_at(8),
            reference_id: [b[12], b[13], b[14], b[15]],
            reference: t_at(16),
            origin: t_at(24),
            receive: t_at(32),
            transmit: t_at(40),
        })
    }

    pub fn root_delay_ns(&self) -> i64 {
        short_to_ns(self.root_delay)
    }

    pub fn root_dispersion_ns(&self) -> i64 {
        short_to_ns(self.root_dispersion)
    }

    #[cfg(test)]
    pub fn set_root(&mut self, delay_ns: i64, dispersion_ns: i64) {
        self.root_delay = ns_to_short(delay_ns);
        self.root_dispersion = ns_to_short(dispersion_ns);
    }
}

/// Why an answer was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Short(usize),
    Mode(u8),
    Version(u8),
    /// The origin timestamp is not our request's nonce.
    Origin,
    /// Stratum 0: a kiss-o'-death with its code.
    Kiss([u8; 4]),
    Unsynchronised,
    Stratum(u8),
    ZeroTimestamp,
    /// The server says it sent its answer before it got our request.
    Disorder,
    RootDelay(i64),
    RootDispersion(i64),
    Distance(i64),
    /// The server held our request longer than the whole round trip took.
    NegativeDelay(i64),
    /// The server's time is before the floor (the image's build time).
    BeforeFloor {
        server_ns: i64,
        floor_ns: i64,
    },
}

impl Refusal {
    /// The kiss code, for a kiss-o'-death.
    pub fn kiss_code(&self) -> Option<String> {
        match self {
            Refusal::Kiss(c) => Some(kiss_text(c)),
            _ => None,
        }
    }
}

fn kiss_text(c: &[u8; 4]) -> String {
    c.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}

fn secs(ns: i64) -> String {
    format!("{:.3} s", ns as f64 / NS as f64)
}

/// RFC 3339 for a Unix time in nanoseconds (or the raw number when out of range).
pub fn rfc3339(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(ns as i128).map(|t| t.to_string()).unwrap_or_else(|_| format!("{ns} ns"))
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Short(n) => write!(f, "{n} bytes, shorter than an NTP header ({PACKET_LEN})"),
            Refusal::Mode(m) => write!(f, "mode {m}, not a server answer (4)"),
            Refusal::Version(v) => write!(f, "NTP version {v} (only 3 and 4 are understood)"),
            Refusal::Origin => write!(f, "its origin timestamp is not our request's"),
            Refusal::Kiss(c) => write!(f, "kiss-o'-death {}", kiss_text(c)),
            Refusal::Unsynchronised => {
                write!(f, "the server says its clock is unsynchronised (leap indicator 3)")
            }
            Refusal::Stratum(s) => write!(f, "stratum {s} (unsynchronised; 1-15 are usable)"),
            Refusal::ZeroTimestamp => write!(f, "its receive or transmit timestamp is zero"),
            Refusal::Disorder => write!(f, "its transmit timestamp is before its receive timestamp"),
            Refusal::RootDelay(d) => write!(f, "root delay {} (at most 16 s is sane)", secs(*d)),
            Refusal::RootDispersion(d) => write!(f, "root dispersion {} (at most 16 s is sane)", secs(*d)),
            Refusal::Distance(d) => {
                write!(f, "root distance {} is above {}", secs(*d), secs(MAX_DISTANCE_NS))
            }
            Refusal::NegativeDelay(d) => write!(f, "negative round-trip delay {}", secs(*d)),
            Refusal::BeforeFloor { server_ns, floor_ns } => write!(
                f,
                "its time {} is before this image was built ({})",
                rfc3339(*server_ns),
                rfc3339(*floor_ns)
            ),
        }
    }
}

/// What a good answer says about our clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// How far our clock is behind the server's (positive: ours is slow), ns.
    pub offset_ns: i64,
    /// The round trip minus the server's processing time, ns.
    pub delay_ns: i64,
    /// Root delay / 2 + root dispersion + delay / 2: the bound on the server's error as seen
    /// from here, ns.
    pub distance_ns: i64,
    pub stratum: u8,
    /// The server's transmit time (Unix ns).
    pub server_ns: i64,
}

/// Judge the answer `p` to the request that carried `nonce`, sent at local time `t1_ns` and
/// received at `t4_ns` (both Unix ns by the local clock). `floor_ns`: the earliest believable
/// time.
pub fn judge(
    p: &Packet,
    nonce: NtpTime,
    t1_ns: i64,
    t4_ns: i64,
    floor_ns: Option<i64>,
) -> Result<Sample, Refusal> {
    if p.mode != MODE_SERVER {
        return Err(Refusal::Mode(p.mode));
    }
    if !(3..=4).contains(&p.version) {
        return Err(Refusal::Version(p.version));
    }
    if p.origin != nonce || nonce.is_zero() {
        return Err(Refusal::Origin);
    }
    if p.stratum == 0 {
        return Err(Refusal::Kiss(p.reference_id));
    }
    if p.leap == LEAP_UNSYNCHRONISED {
        return Err(Refusal::Unsynchronised);
    }
    if p.stratum > 15 {
        return Err(Refusal::Stratum(p.stratum));
    }
    if p.receive.is_zero() || p.transmit.is_zero() {
        return Err(Refusal::ZeroTimestamp);
    }
    let (t2, t3) = (p.receive.to_unix_ns(), p.transmit.to_unix_ns());
    if t3 < t2 {
        return Err(Refusal::Disorder);
    }
    let (root_delay, root_disp) = (p.root_delay_ns(), p.root_dispersion_ns());
    if root_delay >= MAX_ROOT {
        return Err(Refusal::RootDelay(root_delay));
    }
    if root_disp >= MAX_ROOT {
        return Err(Refusal::RootDispersion(root_disp));
    }
    let delay = (t4_ns - t1_ns) - (t3 - t2);
    if delay < 0 {
        return Err(Refusal::NegativeDelay(delay));
    }
    let distance = root_delay / 2 + root_disp + delay / 2;
    if distance > MAX_DISTANCE_NS {
        return Err(Refusal::Distance(distance));
    }
    if let Some(floor_ns) = floor_ns.filter(|&f| t3 < f) {
        return Err(Refusal::BeforeFloor { server_ns: t3, floor_ns });
    }
    // ((T2 - T1) + (T3 - T4)) / 2, summed as halves so that far-off clocks cannot overflow.
    let offset = (t2 - t1_ns) / 2 + (t3 - t4_ns) / 2;
    Ok(Sample {
        offset_ns: offset,
        delay_ns: delay,
        distance_ns: distance,
        stratum: p.stratum,
        server_ns: t3,
    })
}

/// One entry of `settings.ntp.time-servers`: a host name, an IPv4 address or an IPv6 address
/// (bare or in brackets), optionally with `:port` (default 123; an IPv6 address needs the
/// brackets for a port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerSpec {
    pub host: String,
    pub port: u16,
}

/// The longest DNS name.
const MAX_NAME: usize = 253;

fn valid_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= MAX_NAME
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl ServerSpec {
    pub fn parse(s: &str) -> Result<ServerSpec, String> {
        let bad = |why: &str| Err(format!("'{s}' {why}"));
        let port_of = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("'{s}': '{p}' is not a port (1-65535)")),
            }
        };
        if let Some(rest) = s.strip_prefix('[') {
            let Some((addr, after)) = rest.split_once(']') else {
                return bad("has no closing ']'");
            };
            if addr.parse::<Ipv6Addr>().is_err() {
                return bad("has no IPv6 address in its brackets");
            }
            let port = match after {
                "" => NTP_PORT,
                p => match p.strip_prefix(':') {
                    Some(p) => port_of(p)?,
                    None => return bad("has something other than ':port' after ']'"),
                },
            };
            return Ok(ServerSpec { host: addr.into(), port });
        }
        if s.parse::<Ipv6Addr>().is_ok() {
            return Ok(ServerSpec { host: s.into(), port: NTP_PORT });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (s, NTP_PORT),
        };
        if host.parse::<Ipv4Addr>().is_err() && !valid_name(host) {
            return bad(
                "is not a host name, IPv4 address or IPv6 address (optionally with :port; [IPv6]:port)",
            );
        }
        Ok(ServerSpec { host: host.into(), port })
    }

    /// Its addresses: literal ones as they are, names through the system resolver
    /// (getaddrinfo: /etc/hosts and the DNS servers in /etc/resolv.conf).
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        use std::net::ToSocketAddrs;
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in (self.host.as_str(), self.port).to_socket_addrs()? {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(out)
    }
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.host.contains(':')) {
            (NTP_PORT, _) => f.write_str(&self.host),
            (p, true) => write!(f, "[{}]:{p}", self.host),
            (p, false) => write!(f, "{}:{p}", self.host),
        }
    }
}

/// A fresh random nonce for a request (never zero).
pub fn nonce() -> NtpTime {
    use ring::rand::SecureRandom;
    use std::sync::atomic::{AtomicU64, Ordering};
    static FALLBACK: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut b = [0u8; 8];
    loop {
        let n = match ring::rand::SystemRandom::new().fill(&mut b) {
            Ok(()) => u64::from_be_bytes(b),
            // No kernel randomness (not on Linux >= 3.17): the clock's nanoseconds, stirred.
            Err(_) => {
                let t =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                (t.as_nanos() as u64).wrapping_mul(FALLBACK.fetch_add(0x9e37_79b9, Ordering::Relaxed) | 1)
            }
        };
        if n != 0 {
            return NtpTime(n);
        }
    }
}

/// Why one exchange gave no usable answer.
#[derive(Debug)]
pub enum QueryError {
    /// The socket could not be opened, connected or written.
    Io(io::Error),
    /// No answer of ours in time; notes on packets that were ignored.
    Timeout { waited: Duration, ignored: Vec<String> },
    /// Our answer arrived and was refused.
    Refused(Refusal),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Io(e) => write!(f, "{e}"),
            QueryError::Timeout { waited, ignored } => {
                write!(f, "no answer within {:.1} s", waited.as_secs_f64())?;
                if !ignored.is_empty() {
                    write!(f, " (ignored: {})", ignored.join("; "))?;
                }
                Ok(())
            }
            QueryError::Refused(r) => write!(f, "answer refused: {r}"),
        }
    }
}

/// Ask the server at `addr` once and judge its answer. `now_ns` reads the local clock (Unix
/// ns); `floor_ns` is the earliest believable time.
pub fn query(
    addr: SocketAddr,
    timeout: Duration,
    now_ns: &dyn Fn() -> i64,
    floor_ns: Option<i64>,
) -> Result<Sample, QueryError> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).map_err(QueryError::Io)?;
    // Connected: the kernel drops datagrams from any other address and port.
    sock.connect(addr).map_err(QueryError::Io)?;
    let nonce = nonce();
    let req = Packet::request(nonce).encode();
    let t1 = now_ns();
    let sent = Instant::now();
    sock.send(&req).map_err(QueryError::Io)?;
    let mut buf = [0u8; RECV_BUF];
    let mut ignored = Vec::new();
    loop {
        let left = timeout.saturating_sub(sent.elapsed());
        if left.is_zero() {
            return Err(QueryError::Timeout { waited: timeout, ignored });
        }
        sock.set_read_timeout(Some(left)).map_err(QueryError::Io)?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ICMP port unreachable and the like, reported on a connected socket.
            Err(e) => return Err(QueryError::Io(e)),
        };
        let t4 = t1 + sent.elapsed().as_nanos() as i64;
        match Packet::decode(&buf[..n]) {
            Ok(p) if p.origin == nonce => {
                return judge(&p, nonce, t1, t4, floor_ns).map_err(QueryError::Refused)
            }
            Ok(_) => note(&mut ignored, Refusal::Origin),
            Err(r) => note(&mut ignored, r),
        }
    }
}

/// Record why a packet was ignored (the first few reasons).
fn note(ignored: &mut Vec<String>, r: Refusal) {
    if ignored.len() < MAX_IGNORED_NOTES {
        ignored.push(r.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T2026: i64 = 1_796_022_788 * NS; // 2026-11-30T07:13:08Z

    #[test]
    fn timestamps_round_trip_across_eras() {
        for ns in [
            0,
            T2026 + 123_456_789,
            -5 * NS,                // 1969
            2_085_978_496 * NS - 1, // just before 2036-02-07T06:28:16Z, the end of era 0
            2_085_978_496 * NS,
            2_085_978_496 * NS + 999_999_999,
            4_000_000_000 * NS, // 2096
        ] {
            let back = NtpTime::from_unix_ns(ns).to_unix_ns();
            assert!((back - ns).abs() <= 1, "{ns} came back as {back}");
        }
        // The top bit clear means era 1: 2036-02-07T06:28:16Z.
        assert_eq!(NtpTime(0x0000_0000_0000_0000).to_unix_ns(), 2_085_978_496 * NS);
        // RFC 5905's example: 1900 + 0x83aa7e80 seconds is 1970-01-01.
        assert_eq!(NtpTime(0x83aa_7e80_0000_0000).to_unix_ns(), 0);
        assert_eq!(NtpTime(0x83aa_7e80_8000_0000).to_unix_ns(), NS / 2);
    }

    #[test]
    fn short_format_is_16_16_seconds() {
        assert_eq!(short_to_ns(0x0001_0000), NS);
        assert_eq!(short_to_ns(0x0000_8000), NS / 2);
        assert_eq!(ns_to_short(NS), 0x0001_0000);
        assert_eq!(ns_to_short(-1), 0);
    }

    #[test]
    fn packets_encode_and_decode_field_by_field() {
        let p = Packet {
            leap: 1,
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            poll: 6,
            precision: -20,
            root_delay: 0x0000_1234,
            root_dispersion: 0x0002_0000,
            reference_id: *b"GPS\0",
            reference: NtpTime(0x0102_0304_0506_0708),
            origin: NtpTime(0x1112_1314_1516_1718),
            receive: NtpTime(0x2122_2324_2526_2728),
            transmit: NtpTime(0x3132_3334_3536_3738),
        };
        let b = p.encode();
        assert_eq!(b[0], 0b01_100_100);
        assert_eq!(b[3], 0xec);
        assert_eq!(&b[12..16], b"GPS\0");
        assert_eq!(&b[40..48], &[0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38]);
        assert_eq!(Packet::decode(&b), Ok(p));
        // Extension fields or a MAC after the header are ignored.
        let mut long = b.to_vec();
        long.extend_from_slice(&[0xaa; 20]);
        assert_eq!(Packet::decode(&long), Ok(p));
        assert_eq!(Packet::decode(&b[..47]), Err(Refusal::Short(47)));
        let req = Packet::request(NtpTime(42)).encode();
        assert_eq!(req[0], 0x23, "LI 0, version 4, mode 3");
        assert_eq!(&req[1..40], &[0u8; 39][..], "a request carries nothing but the nonce");
    }

    /// A good answer to `nonce` by a server whose clock is `skew_ns` ahead of ours, for a
    /// request sent at `t1` with a symmetric 10 ms round trip and 1 ms at the server.
    fn answer(nonce: NtpTime, t1: i64, skew_ns: i64) -> (Packet, i64) {
        let t2 = t1 + 5_000_000 + skew_ns;
        let t3 = t2 + 1_000_000;
        let t4 = t1 + 11_000_000;
        let mut p = Packet {
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            reference_id: *b"\x0a\0\0\x01",
            reference: NtpTime::from_unix_ns(t2 - NS),
            origin: nonce,
            receive: NtpTime::from_unix_ns(t2),
            transmit: NtpTime::from_unix_ns(t3),
            ..Default::default()
        };
        p.set_root(20_000_000, 10_000_000);
        (p, t4)
    }

    #[test]
    fn offset_and_delay_follow_rfc_5905() {
        let n = NtpTime(0xdead_beef_0000_0001);
        for skew in [0, 250_000_000, -3 * NS, 25 * 365 * 86_400 * NS] {
            let (p, t4) = answer(n, T2026, skew);
            let s = judge(&p, n, T2026, t4, None).unwrap();
            assert!((s.offset_ns - skew).abs() < 2, "skew {skew}: offset {}", s.offset_ns);
            assert!((s.delay_ns - 10_000_000).abs() < 2, "delay {}", s.delay_ns);
            assert!((s.distance_ns - (10_000_000 + 10_000_000 + 5_000_000)).abs() < 50_000, "{s:?}");
        }
        // A clock 25 years behind (the QEMU case starts in 2001) still gives the right offset.
        let t1 = T2026 - 25 * 365 * 86_400 * NS;
        let (p, t4) = answer(n, t1, 25 * 365 * 86_400 * NS);
        let off = judge(&p, n, t1, t4, None).unwrap().offset_ns;
        assert!((off - 25 * 365 * 86_400 * NS).abs() < 2, "{off}");
    }

    #[test]
    fn answers_that_break_a_rule_are_refused() {
        let n = NtpTime(77);
        let (good, t4) = answer(n, T2026, 0);
        let with = |f: &dyn Fn(&mut Packet)| {
            let mut p = good;
            f(&mut p);
            judge(&p, n, T2026, t4, None)
        };
        assert!(with(&|_| {}).is_ok());
        type Rule<'a> = (&'a dyn Fn(&mut Packet), Refusal);
        let table: Vec<Rule> = vec![
            (&|p| p.mode = 5, Refusal::Mode(5)),
            (&|p| p.mode = 3, Refusal::Mode(3)),
            (&|p| p.version = 2, Refusal::Version(2)),
            (&|p| p.version = 5, Refusal::Version(5)),
            (&|p| p.origin = NtpTime(78), Refusal::Origin),
            (
                &|p| {
                    p.stratum = 0;
                    p.reference_id = *b"RATE"
                },
                Refusal::Kiss(*b"RATE"),
            ),
            (&|p| p.leap = 3, Refusal::Unsynchronised),
            (&|p| p.stratum = 16, Refusal::Stratum(16)),
            (&|p| p.transmit = NtpTime(0), Refusal::ZeroTimestamp),
            (&|p| p.receive = NtpTime(0), Refusal::ZeroTimestamp),
            (&|p| p.transmit = NtpTime::from_unix_ns(T2026), Refusal::Disorder),
            (&|p| p.root_delay = 16 << 16, Refusal::RootDelay(16 * NS)),
            (&|p| p.root_dispersion = 20 << 16, Refusal::RootDispersion(20 * NS)),
            (&|p| p.root_dispersion = 2 << 16, Refusal::Distance(10_000_000 + 2 * NS + 5_000_000)),
            // The server claims 20 ms of processing inside an 11 ms round trip.
            (&|p| p.transmit = NtpTime::from_unix_ns(T2026 + 25_000_000), Refusal::NegativeDelay(-9_000_000)),
        ];
        // Durations in the 16.16 format are rounded to 15 µs.
        let close = |got: &Refusal, want: &Refusal| match (got, want) {
            (Refusal::Distance(a), Refusal::Distance(b))
            | (Refusal::NegativeDelay(a), Refusal::NegativeDelay(b)) => (a - b).abs() < 50_000,
            _ => got == want,
        };
        for (i, (f, want)) in table.iter().enumerate() {
            let got = with(*f).unwrap_err();
            assert!(close(&got, want), "rule {i}: {got:?}, want {want:?}");
        }
        // Leap indicators 1 and 2 (a leap second announced) are fine; version 3 is fine.
        assert!(with(&|p| p.leap = 2).is_ok());
        assert!(with(&|p| p.version = 3).is_ok());
        // Our own request's nonce of zero would accept anything: never matches.
        let (z, t4) = answer(NtpTime(0), T2026, 0);
        assert_eq!(judge(&z, NtpTime(0), T2026, t4, None), Err(Refusal::Origin));
        // Before the floor.
        let r = judge(&good, n, T2026, t4, Some(T2026 + NS)).unwrap_err();
        assert!(matches!(r, Refusal::BeforeFloor { .. }), "{r:?}");
        assert!(r.to_string().contains("before this image was built"), "{r}");
        assert_eq!(Refusal::Kiss(*b"DENY").kiss_code().as_deref(), Some("DENY"));
    }

    #[test]
    fn server_specs_parse_and_print() {
        let ok = [
            ("pool.ntp.org", "pool.ntp.org", 123, "pool.ntp.org"),
            ("time.aws.com.", "time.aws.com.", 123, "time.aws.com."),
            ("169.254.169.123", "169.254.169.123", 123, "169.254.169.123"),
            ("10.0.2.2:12345", "10.0.2.2", 12345, "10.0.2.2:12345"),
            ("ntp_1.example:123", "ntp_1.example", 123, "ntp_1.example"),
            ("fd00::1", "fd00::1", 123, "fd00::1"),
            ("[fd00::1]", "fd00::1", 123, "fd00::1"),
            ("[::1]:1230", "::1", 1230, "[::1]:1230"),
            ("localhost", "localhost", 123, "localhost"),
        ];
        for (s, host, port, shown) in ok {
            let spec = ServerSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!((spec.host.as_str(), spec.port), (host, port), "{s}");
            assert_eq!(spec.to_string(), shown);
        }
        for s in [
            "",
            ":123",
            "host:",
            "host:0",
            "host:70000",
            "[::1",
            "[::1]x",
            "[nothost]:1",
            "a..b",
            "-a.b",
            "http://pool.ntp.org",
            "a b",
            &"a".repeat(64),
            &format!("{}.org", "a.".repeat(130)),
        ] {
            assert!(ServerSpec::parse(s).is_err(), "'{s}' accepted");
        }
    }

    #[test]
    fn literal_addresses_need_no_resolver_and_names_use_it() {
        let v6 = ServerSpec::parse("[::1]:5").unwrap().resolve().unwrap();
        assert_eq!(v6, vec!["[::1]:5".parse().unwrap()]);
        let lh = ServerSpec::parse("localhost:9").unwrap().resolve().unwrap();
        assert!(lh.iter().all(|a| a.ip().is_loopback() && a.port() == 9) && !lh.is_empty(), "{lh:?}");
    }

    #[test]
    fn nonces_differ() {
        let a: Vec<NtpTime> = (0..16).map(|_| nonce()).collect();
        for (i, x) in a.iter().enumerate() {
            assert!(!x.is_zero());
            assert!(a[i + 1..].iter().all(|y| y != x));
        }
    }
}
