//! rtnetlink, hand-encoded: list links and IPv4 addresses and routes, set a link up or down or
//! its MTU, add and delete IPv4 addresses, add a default route; for net.toml's devices, create
//! VLANs and active-backup bonds (`IFLA_LINKINFO`), enslave a link to a bond (`IFLA_MASTER`),
//! delete links, add IPv6 addresses and routes of either family (gateway, metric, preferred
//! source, table).
//!
//! Messages are built and parsed by pure functions over byte slices (tested below without a
//! kernel); [`Rtnl`] sends them over the socket from `sys::net` and checks every `NLMSG_ERROR`
//! ack, turning a refusal into [`Error::Netlink`] naming the operation and the interface, with
//! the kernel's extended-ack text when it gives one.
//!
//! Layouts (all integers in host byte order, addresses in network order) follow
//! <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h> and <linux/if_addr.h>.
//! Limits: addresses and routes are listed for IPv4 and the main table only; no notifications
//! (no multicast groups). Nested attributes are sent without `NLA_F_NESTED`, as iproute2 sends
//! them (the tests compare whole messages with what `ip` sent, read with strace).

// Route listing, a few accessors and constants serve the namespace tests and diagnostics only.
#![cfg_attr(not(test), allow(dead_code))]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::Error;
use crate::sys::net::Netlink;

// Message types and flags.
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
/// In an error ack: the original request was not echoed back (NETLINK_CAP_ACK).
const NLM_F_CAPPED: u16 = 0x100;
/// In an error ack: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

// Attributes.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
pub const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;

pub const IFF_UP: u32 = 0x1;
pub const IFF_LOOPBACK: u32 = 0x8;
pub const IFF_LOWER_UP: u32 = 0x1_0000;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

const HDR: usize = 16;
const IFINFOMSG: usize = 16;
const IFADDRMSG: usize = 8;
const RTMSG: usize = 12;

/// Who installed a route, as `ip route` shows it (`proto dhcp`, `proto static`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteProto {
    Dhcp = 16,
    Static = 4,
}

/// What kind of link the kernel reports (`ifi_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Ethernet,
    Loopback,
    Other(u16),
}

/// One network interface, as an `RTM_GETLINK` dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// `IFF_*` flags, including `IFF_LOWER_UP` (carrier).
    pub flags: u32,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// The driver kind of a virtual link (`IFLA_INFO_KIND`: `bond`, `bridge`, `veth`, `vlan`,
    /// ...); None for a device of hardware (or of a hypervisor, like virtio-net).
    pub virtual_kind: Option<String>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.flags & IFF_UP != 0
    }

    pub fn has_carrier(&self) -> bool {
        self.flags & IFF_LOWER_UP != 0
    }

    pub fn is_loopback(&self) -> bool {
        self.kind == LinkKind::Loopback || self.flags & IFF_LOOPBACK != 0
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`, or `-` when the link has none.
    pub fn mac_string(&self) -> String {
        match self.mac {
            Some(m) => m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
            None => "-".to_string(),
        }
    }
}

/// One IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

/// One IPv4 route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Addr,
    pub dst_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.dst_len == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request under construction: header, fixed family struct, then attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in by finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours in
        buf.extend_from_slice(fixed);
        buf.resize(align4(buf.len()), 0);
        Msg { buf }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn ifinfomsg(family: u8, index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG] {
    let mut b = [0u8; IFINFOMSG];
    b[0] = family;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn ifaddrmsg(prefix_len: u8, index: u32) -> [u8; IFADDRMSG] {
    let mut b = [0u8; IFADDRMSG];
    b[0] = AF_INET;
    b[1] = prefix_len;
    b[3] = RT_SCOPE_UNIVERSE;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b
}

/// `RTM_GETLINK` dump of every link.
pub fn get_links_msg(seq: u32) -> Vec<u8> {
    Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, &ifinfomsg(AF_UNSPEC, 0, 0, 0)).finish()
}

/// `RTM_NEWLINK` setting `IFF_UP` on link `index`.
pub fn set_up_msg(seq: u32, index: u32) -> Vec<u8> {
    Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg(AF_UNSPEC, index, IFF_UP, IFF_UP))
        .finish()
}

/// `RTM_NEWLINK` setting the MTU of link `index`.
pub fn set_mtu_msg(seq: u32, index: u32, mtu: u32) -> Vec<u8> {
    Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg(AF_UNSPEC, index, 0, 0))
        .attr(IFLA_MTU, &mtu.to_ne_bytes())
        .finish()
}

/// The directed broadcast address of `address/prefix_len`, or None for /31 and /32, which
/// have none (RFC 3021).
pub fn broadcast(address: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    if prefix_len >= 31 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(address) | !prefix_mask(prefix_len)))
}

/// The netmask of a prefix length as a host-order u32 (0 → 0, 24 → 0xffffff00, ≥32 → all ones).
pub fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - p),
    }
}

/// `RTM_NEWADDR` (create or replace) of `address/prefix_len` on link `index`, with
/// `IFA_LOCAL`, `IFA_ADDRESS` and, below /31, `IFA_BROADCAST`.
pub fn add_addr_msg(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut m = Msg::new(RTM_NEWADDR, flags, seq, &ifaddrmsg(prefix_len, index))
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets());
    if let Some(b) = broadcast(address, prefix_len) {
        m = m.attr(IFA_BROADCAST, &b.octets());
    }
    m.finish()
}

/// `RTM_DELADDR` of `address/prefix_len` on link `index`.
pub fn del_addr_msg(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    Msg::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq, &ifaddrmsg(prefix_len, index))
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .finish()
}

/// `RTM_GETADDR` dump of every IPv4 address.
pub fn get_addrs_msg(seq: u32) -> Vec<u8> {
    Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, &ifaddrmsg(0, 0)).finish()
}

/// `RTM_GETROUTE` dump of every IPv4 route.
pub fn get_routes_msg(seq: u32) -> Vec<u8> {
    let mut rt = [0u8; RTMSG];
    rt[0] = AF_INET;
    Msg::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, &rt).finish()
}

/// `RTM_NEWROUTE` (create or replace) of the default route via `gateway` out of link `index`
/// in the main table. `onlink` tells the kernel the gateway is reachable on the link even
/// though no address's prefix covers it.
pub fn default_route_msg(
    seq: u32,
    index: u32,
    gateway: Ipv4Addr,
    proto: RouteProto,
    onlink: bool,
) -> Vec<u8> {
    let mut rt = [0u8; RTMSG];
    rt[0] = AF_INET;
    rt[4] = RT_TABLE_MAIN;
    rt[5] = proto as u8;
    rt[6] = RT_SCOPE_UNIVERSE;
    rt[7] = RTN_UNICAST;
    let flags = if onlink { RTNH_F_ONLINK } else { 0 };
    rt[8..12].copy_from_slice(&flags.to_ne_bytes());
    Msg::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, &rt)
        .attr(RTA_GATEWAY, &gateway.octets())
        .attr(RTA_OIF, &index.to_ne_bytes())
        .finish()
}

// ---------------------------------------------------------------------------------------------
// Virtual links, IPv6 addresses and routes of any family (what net.toml's devices need)

/// How an active-backup bond watches its members (`IFLA_BOND_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BondMonitor {
    /// MII link state every `frequency_ms`; a member counts as up (down) after the delay.
    Mii { frequency_ms: u32, updelay_ms: u32, downdelay_ms: u32 },
    /// ARP probes to `targets` every `interval_ms`, their replies checked as `validate` says.
    Arp { interval_ms: u32, validate: ArpValidate, targets: Vec<Ipv4Addr> },
}

/// `arp_validate` (<linux/if_bonding.h> `BOND_ARP_VALIDATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpValidate {
    None = 0,
    Active = 1,
    Backup = 2,
    All = 3,
}

/// The bond driver's limit on ARP targets (`BOND_MAX_ARP_TARGETS`).
pub const MAX_ARP_TARGETS: usize = 16;

/// An active-backup bond's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bond {
    pub monitor: Option<BondMonitor>,
    pub min_links: Option<u32>,
}

/// A route of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    /// The destination network; `dst_len` 0 is the default route.
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    /// `RTA_PRIORITY` (`metric` in `ip route`).
    pub metric: Option<u32>,
    /// `RTA_PREFSRC` (`src` in `ip route`): the source address of traffic the route carries.
    pub prefsrc: Option<IpAddr>,
    pub table: u32,
    pub proto: RouteProto,
}

const RTM_DELLINK: u16 = 17;
const NLM_F_EXCL: u16 = 0x200;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VLAN_ID: u16 = 1;
const IFLA_BOND_MODE: u16 = 1;
const IFLA_BOND_MIIMON: u16 = 3;
const IFLA_BOND_UPDELAY: u16 = 4;
const IFLA_BOND_DOWNDELAY: u16 = 5;
const IFLA_BOND_ARP_INTERVAL: u16 = 7;
const IFLA_BOND_ARP_IP_TARGET: u16 = 8;
const IFLA_BOND_ARP_VALIDATE: u16 = 9;
const IFLA_BOND_MIN_LINKS: u16 = 18;
const BOND_MODE_ACTIVEBACKUP: u8 = 1;
const AF_INET6: u8 = 10;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RT_SCOPE_LINK: u8 = 253;
const RT_TABLE_UNSPEC: u8 = 0;

/// The attributes of `attrs` back to back, as the data of a nested attribute.
fn nest(attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, data) in attrs {
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(align4(out.len()), 0);
    }
    out
}

fn ip_octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn name_attr(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b
}

const CREATE_EXCL: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;

/// `RTM_NEWLINK` creating VLAN `name` with tag `id` on link `parent` (`ip link add link PARENT
/// name NAME type vlan id ID`).
pub fn new_vlan_msg(seq: u32, name: &str, parent: u32, id: u16) -> Vec<u8> {
    let data = nest(&[(IFLA_VLAN_ID, &id.to_ne_bytes())]);
    let info = nest(&[(IFLA_INFO_KIND, b"vlan"), (IFLA_INFO_DATA, &data)]);
    Msg::new(RTM_NEWLINK, CREATE_EXCL, seq, &ifinfomsg(AF_UNSPEC, 0, 0, 0))
        .attr(IFLA_LINK, &parent.to_ne_bytes())
        .attr(IFLA_IFNAME, &name_attr(name))
        .attr(IFLA_LINKINFO, &info)
        .finish()
}

/// `RTM_NEWLINK` creating an active-backup bond `name` (`ip link add NAME type bond mode
/// active-backup miimon ... | arp_interval ... arp_validate ... arp_ip_target ...`).
pub fn new_bond_msg(seq: u32, name: &str, bond: &Bond) -> Vec<u8> {
    let mut data = nest(&[(IFLA_BOND_MODE, &[BOND_MODE_ACTIVEBACKUP])]);
    match &bond.monitor {
        Some(BondMonitor::Mii { frequency_ms, updelay_ms, downdelay_ms }) => data.extend(nest(&[
            (IFLA_BOND_MIIMON, &frequency_ms.to_ne_bytes()),
            (IFLA_BOND_UPDELAY, &updelay_ms.to_ne_bytes()),
            (IFLA_BOND_DOWNDELAY, &downdelay_ms.to_ne_bytes()),
        ])),
        Some(BondMonitor::Arp { interval_ms, validate, targets }) => {
            let octets: Vec<[u8; 4]> = targets.iter().take(MAX_ARP_TARGETS).map(|t| t.octets()).collect();
            let list: Vec<(u16, &[u8])> =
                octets.iter().enumerate().map(|(i, o)| (i as u16, &o[..])).collect();
            data.extend(nest(&[
                (IFLA_BOND_ARP_INTERVAL, &interval_ms.to_ne_bytes()),
                (IFLA_BOND_ARP_VALIDATE, &(*validate as u32).to_ne_bytes()),
                (IFLA_BOND_ARP_IP_TARGET, &nest(&list)),
            ]))
        }
        None => {}
    }
    if let Some(m) = bond.min_links {
        data.extend(nest(&[(IFLA_BOND_MIN_LINKS, &m.to_ne_bytes())]));
    }
    let info = nest(&[(IFLA_INFO_KIND, b"bond"), (IFLA_INFO_DATA, &data)]);
    Msg::new(RTM_NEWLINK, CREATE_EXCL, seq, &ifinfomsg(AF_UNSPEC, 0, 0, 0))
        .attr(IFLA_IFNAME, &name_attr(name))
        .attr(IFLA_LINKINFO, &info)
        .finish()
}

/// `RTM_NEWLINK` clearing `IFF_UP` on link `index`.
pub fn set_down_msg(seq: u32, index: u32) -> Vec<u8> {
    Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg(AF_UNSPEC, index, 0, IFF_UP)).finish()
}

/// `RTM_NEWLINK` making link `index` a member of `master` (`ip link set DEV master BOND`).
pub fn set_master_msg(seq: u32, index: u32, master: u32) -> Vec<u8> {
    Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg(AF_UNSPEC, index, 0, 0))
        .attr(IFLA_MASTER, &master.to_ne_bytes())
        .finish()
}

/// `RTM_DELLINK` of link `index`.
pub fn del_link_msg(seq: u32, index: u32) -> Vec<u8> {
    Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &ifinfomsg(AF_UNSPEC, index, 0, 0)).finish()
}

/// `RTM_NEWADDR` (create or replace) of an IPv6 `address/prefix_len` on link `index`.
pub fn add_addr6_msg(seq: u32, index: u32, address: Ipv6Addr, prefix_len: u8) -> Vec<u8> {
    let mut fixed = ifaddrmsg(prefix_len, index);
    fixed[0] = AF_INET6;
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    Msg::new(RTM_NEWADDR, flags, seq, &fixed)
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .finish()
}

/// `RTM_NEWROUTE` (create or replace) of `r`. Without a gateway the route is on the link
/// (scope link); a table above 255 goes in `RTA_TABLE`.
pub fn route_msg(seq: u32, r: &RouteSpec) -> Vec<u8> {
    let mut rt = [0u8; RTMSG];
    rt[0] = family(r.dst);
    rt[1] = r.dst_len;
    rt[4] = u8::try_from(r.table).unwrap_or(RT_TABLE_UNSPEC);
    rt[5] = r.proto as u8;
    rt[6] = if r.gateway.is_some() { RT_SCOPE_UNIVERSE } else { RT_SCOPE_LINK };
    rt[7] = RTN_UNICAST;
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, &rt);
    if r.dst_len > 0 {
        m = m.attr(RTA_DST, &ip_octets(r.dst));
    }
    if let Some(gw) = r.gateway {
        m = m.attr(RTA_GATEWAY, &ip_octets(gw));
    }
    if let Some(metric) = r.metric {
        m = m.attr(RTA_PRIORITY, &metric.to_ne_bytes());
    }
    if let Some(src) = r.prefsrc {
        m = m.attr(RTA_PREFSRC, &ip_octets(src));
    }
    m = m.attr(RTA_OIF, &r.oif.to_ne_bytes());
    if r.table > 255 {
        m = m.attr(RTA_TABLE, &r.table.to_ne_bytes());
    }
    m.finish()
}

// ---------------------------------------------------------------------------------------------
// Parsing

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// One message out of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

/// Split a datagram into its messages. Stops at the first malformed header (a length below
/// the header size or past the end); what came before it is kept.
pub fn split(mut data: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    while data.len() >= HDR {
        let Some(len) = ne_u32(data, 0).map(|l| l as usize) else { break };
        if len < HDR || len > data.len() {
            break;
        }
        let (Some(kind), Some(flags), Some(seq)) = (ne_u16(data, 4), ne_u16(data, 6), ne_u32(data, 8)) else {
            break;
        };
        out.push(Reply { kind, flags, seq, payload: &data[HDR..len] });
        data = &data[align4(len).min(data.len())..];
    }
    out
}

/// Iterate over the `(type, data)` attributes in `b`, stopping at the first malformed one.
pub fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(kind)) = (ne_u16(b, 0), ne_u16(b, 2)) else { break };
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        // Strip NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        out.push((kind & 0x3fff, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// What an `NLMSG_ERROR` carries: `errno` (0 for a plain ack) and the kernel's text, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub errno: i32,
    pub message: Option<String>,
}

/// Parse the payload of an `NLMSG_ERROR`; `flags` are the error message's own header flags.
pub fn parse_ack(flags: u16, payload: &[u8]) -> Option<Ack> {
    let err = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The original request's header follows, then (unless capped) its payload.
        let orig_len = ne_u32(payload, 4).map(|l| l as usize).unwrap_or(0);
        let skip = if flags & NLM_F_CAPPED != 0 { HDR } else { orig_len.max(HDR) };
        if let Some(tlvs) = payload.get(4 + align4(skip)..) {
            for (kind, data) in attrs(tlvs) {
                if kind == NLMSGERR_ATTR_MSG {
                    let text = data.split(|&c| c == 0).next().unwrap_or(&[]);
                    message = Some(String::from_utf8_lossy(text).into_owned());
                }
            }
        }
    }
    Some(Ack { errno: err.checked_neg().unwrap_or(i32::MAX), message })
}

/// Parse an `RTM_NEWLINK` payload.
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let ifi_type = ne_u16(payload, 2)?;
    let index = ne_u32(payload, 4)?;
    let flags = ne_u32(payload, 8)?;
    let mut link = Link {
        index,
        name: String::new(),
        kind: match ifi_type {
            ARPHRD_ETHER => LinkKind::Ethernet,
            ARPHRD_LOOPBACK => LinkKind::Loopback,
            other => LinkKind::Other(other),
        },
        flags,
        mac: None,
        mtu: None,
        virtual_kind: None,
    };
    for (kind, data) in attrs(payload.get(IFINFOMSG..)?) {
        match kind {
            IFLA_IFNAME => {
                let name = data.split(|&c| c == 0).next().unwrap_or(&[]);
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = data.try_into().ok(),
            IFLA_MTU => link.mtu = ne_u32(data, 0),
            k if k & 0x3fff == IFLA_LINKINFO => {
                link.virtual_kind =
                    attrs(data).into_iter().find(|(k, _)| k & 0x3fff == IFLA_INFO_KIND).map(|(_, v)| {
                        String::from_utf8_lossy(v.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
                    })
            }
            _ => {}
        }
    }
    Some(link)
}

/// Parse an `RTM_NEWADDR` payload; None for a non-IPv4 or address-less one.
pub fn parse_addr(payload: &[u8]) -> Option<Addr> {
    if *payload.first()? != AF_INET {
        return None;
    }
    let prefix_len = *payload.get(1)?;
    let index = ne_u32(payload, 4)?;
    let (mut local, mut address) = (None, None);
    for (kind, data) in attrs(payload.get(IFADDRMSG..)?) {
        match kind {
            IFA_LOCAL => local = ipv4(data),
            IFA_ADDRESS => address = ipv4(data),
            _ => {}
        }
    }
    Some(Addr { index, address: local.or(address)?, prefix_len })
}

/// Parse an `RTM_NEWROUTE` payload; None for a non-IPv4 one.
pub fn parse_route(payload: &[u8]) -> Option<Route> {
    if *payload.first()? != AF_INET {
        return None;
    }
    let mut route = Route {
        table: u32::from(*payload.get(4)?),
        dst: Ipv4Addr::UNSPECIFIED,
        dst_len: *payload.get(1)?,
        gateway: None,
        oif: None,
    };
    for (kind, data) in attrs(payload.get(RTMSG..)?) {
        match kind {
            RTA_DST => route.dst = ipv4(data).unwrap_or(route.dst),
            RTA_GATEWAY => route.gateway = ipv4(data),
            RTA_OIF => route.oif = ne_u32(data, 0),
            RTA_TABLE => route.table = ne_u32(data, 0).unwrap_or(route.table),
            _ => {}
        }
    }
    Some(route)
}

// ---------------------------------------------------------------------------------------------
// The socket

/// How long to wait for any one answer from the kernel.
const KERNEL_TIMEOUT: Duration = Duration::from_secs(5);
const RECV_BUF: usize = 64 * 1024;

/// An open rtnetlink connection.
pub struct Rtnl {
    sock: Netlink,
    seq: u32,
    buf: Vec<u8>,
}

fn nl_err(op: impl Into<String>, interface: &str, cause: io::Error) -> Error {
    Error::Netlink { op: op.into(), interface: interface.to_string(), cause }
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, Error> {
        let sock =
            Netlink::open_route(KERNEL_TIMEOUT).map_err(|e| nl_err("open a netlink socket", "-", e))?;
        Ok(Rtnl { sock, seq: 0, buf: vec![0; RECV_BUF] })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Send a request carrying `NLM_F_ACK` and wait for its ack.
    fn request(&mut self, msg: &[u8], seq: u32) -> io::Result<()> {
        self.sock.send(msg)?;
        loop {
            let n = self.sock.recv(&mut self.buf)?;
            for reply in split(&self.buf[..n]) {
                if reply.seq != seq || reply.kind != NLMSG_ERROR {
                    continue;
                }
                return ack_result(reply.flags, reply.payload);
            }
        }
    }

    /// Send a dump request and collect the payloads of every message of type `kind`.
    fn dump(&mut self, msg: &[u8], seq: u32, kind: u16) -> io::Result<Vec<Vec<u8>>> {
        self.sock.send(msg)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut self.buf)?;
            for reply in split(&self.buf[..n]) {
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        ack_result(reply.flags, reply.payload)?;
                        return Ok(out);
                    }
                    NLMSG_NOOP => {}
                    k if k == kind => out.push(reply.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let seq = self.next_seq();
        let raw =
            self.dump(&get_links_msg(seq), seq, RTM_NEWLINK).map_err(|e| nl_err("list links", "*", e))?;
        let mut links: Vec<Link> = raw.iter().filter_map(|p| parse_link(p)).collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// IPv4 addresses, all of them or those of link `index`.
    pub fn addrs(&mut self, index: Option<u32>) -> Result<Vec<Addr>, Error> {
        let seq = self.next_seq();
        let raw = self
            .dump(&get_addrs_msg(seq), seq, RTM_NEWADDR)
            .map_err(|e| nl_err("list IPv4 addresses", "*", e))?;
        Ok(raw.iter().filter_map(|p| parse_addr(p)).filter(|a| index.is_none_or(|i| a.index == i)).collect())
    }

    /// IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>, Error> {
        let seq = self.next_seq();
        let raw = self
            .dump(&get_routes_msg(seq), seq, RTM_NEWROUTE)
            .map_err(|e| nl_err("list IPv4 routes", "*", e))?;
        Ok(raw
            .iter()
            .filter_map(|p| parse_route(p))
            .filter(|r| r.table == u32::from(RT_TABLE_MAIN))
            .collect())
    }

    pub fn set_up(&mut self, link: &Link) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&set_up_msg(seq, link.index), seq).map_err(|e| nl_err("set the link up", &link.name, e))
    }

    pub fn set_mtu(&mut self, link: &Link, mtu: u32) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&set_mtu_msg(seq, link.index, mtu), seq)
            .map_err(|e| nl_err(format!("set the MTU to {mtu}"), &link.name, e))
    }

    pub fn add_addr(&mut self, link: &Link, address: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&add_addr_msg(seq, link.index, address, prefix_len), seq)
            .map_err(|e| nl_err(format!("add address {address}/{prefix_len}"), &link.name, e))
    }

    pub fn del_addr(&mut self, link: &Link, address: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&del_addr_msg(seq, link.index, address, prefix_len), seq)
            .map_err(|e| nl_err(format!("delete address {address}/{prefix_len}"), &link.name, e))
    }

    /// Delete an address that may already be gone: deleting a primary address takes the
    /// secondaries of its subnet with it, so a list made before is not current after.
    pub fn del_addr_if_present(
        &mut self,
        link: &Link,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), Error> {
        match self.del_addr(link, address, prefix_len) {
            Err(Error::Netlink { cause, .. }) if cause.kind() == io::ErrorKind::AddrNotAvailable => Ok(()),
            other => other,
        }
    }

    /// Delete every IPv4 address of `link` (the kernel drops the routes through them too).
    pub fn flush(&mut self, link: &Link) -> Result<(), Error> {
        for a in self.addrs(Some(link.index))? {
            self.del_addr_if_present(link, a.address, a.prefix_len)?;
        }
        Ok(())
    }

    /// Add or replace the default route via `gateway` out of `link`. When no address on the
    /// link covers the gateway, the route is marked on-link (as some clouds' /32 leases need).
    pub fn default_route(&mut self, link: &Link, gateway: Ipv4Addr, proto: RouteProto) -> Result<(), Error> {
        let onlink = !self.addrs(Some(link.index))?.iter().any(|a| {
            let m = prefix_mask(a.prefix_len);
            u32::from(a.address) & m == u32::from(gateway) & m
        });
        let seq = self.next_seq();
        self.request(&default_route_msg(seq, link.index, gateway, proto, onlink), seq)
            .map_err(|e| nl_err(format!("add the default route via {gateway}"), &link.name, e))
    }

    /// Create VLAN `name` with tag `id` on `parent`.
    pub fn create_vlan(&mut self, name: &str, parent: &Link, id: u16) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&new_vlan_msg(seq, name, parent.index, id), seq)
            .map_err(|e| nl_err(format!("create VLAN {name} (id {id}) on {}", parent.name), name, e))
    }

    /// Create the active-backup bond `name`.
    pub fn create_bond(&mut self, name: &str, bond: &Bond) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&new_bond_msg(seq, name, bond), seq)
            .map_err(|e| nl_err("create the active-backup bond", name, e))
    }

    pub fn set_down(&mut self, link: &Link) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&set_down_msg(seq, link.index), seq)
            .map_err(|e| nl_err("set the link down", &link.name, e))
    }

    /// Make `link` a member of `master`; the kernel wants it down first.
    pub fn set_master(&mut self, link: &Link, master: &Link) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&set_master_msg(seq, link.index, master.index), seq)
            .map_err(|e| nl_err(format!("add it to {}", master.name), &link.name, e))
    }

    pub fn del_link(&mut self, link: &Link) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&del_link_msg(seq, link.index), seq)
            .map_err(|e| nl_err("delete the link", &link.name, e))
    }

    pub fn add_addr6(&mut self, link: &Link, address: Ipv6Addr, prefix_len: u8) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&add_addr6_msg(seq, link.index, address, prefix_len), seq)
            .map_err(|e| nl_err(format!("add address {address}/{prefix_len}"), &link.name, e))
    }

    /// Add or replace route `r` (its `oif` is `link`).
    pub fn add_route(&mut self, link: &Link, r: &RouteSpec) -> Result<(), Error> {
        let seq = self.next_seq();
        let what = match r.gateway {
            Some(gw) => format!("add the route to {}/{} via {gw}", r.dst, r.dst_len),
            None => format!("add the route to {}/{}", r.dst, r.dst_len),
        };
        self.request(&route_msg(seq, &RouteSpec { oif: link.index, ..*r }), seq)
            .map_err(|e| nl_err(what, &link.name, e))
    }
}

/// Turn an ack's payload into Ok or the kernel's error (with its text when it sent one).
fn ack_result(flags: u16, payload: &[u8]) -> io::Result<()> {
    let ack = parse_ack(flags, payload)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "netlink: truncated error message"))?;
    if ack.errno == 0 {
        return Ok(());
    }
    let os = io::Error::from_raw_os_error(ack.errno);
    Err(match ack.message {
        Some(text) if !text.is_empty() => io::Error::new(os.kind(), format!("{os}: {text}")),
        _ => os,
    })
}

// ---------------------------------------------------------------------------------------------
// IPv6 addresses (for the DHCPv6 client, `super::dhcp6`): listed with their flags, added with
// lifetimes, deleted.

const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
/// Duplicate address detection has not finished: the address cannot be used yet.
pub const IFA_F_TENTATIVE: u32 = 0x40;
/// Duplicate address detection found another node with the address.
pub const IFA_F_DADFAILED: u32 = 0x08;

/// One IPv6 address on an interface, with its `IFA_F_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr6 {
    pub index: u32,
    pub address: std::net::Ipv6Addr,
    pub prefix_len: u8,
    pub flags: u32,
}

impl Addr6 {
    /// Link-local (fe80::/10) and past duplicate address detection: usable as a source.
    pub fn is_usable_link_local(&self) -> bool {
        (self.address.segments()[0] & 0xffc0) == 0xfe80
            && self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) == 0
    }
}

fn ifaddrmsg6(prefix_len: u8, index: u32, scope: u8) -> [u8; IFADDRMSG] {
    let mut b = ifaddrmsg(prefix_len, index);
    b[0] = AF_INET6;
    b[3] = scope;
    b
}

/// `RTM_GETADDR` dump of every IPv6 address.
pub fn get_addrs6_msg(seq: u32) -> Vec<u8> {
    Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, &ifaddrmsg6(0, 0, 0)).finish()
}

/// `RTM_NEWADDR` (create or replace) of `address/prefix_len` on link `index` with lifetimes in
/// seconds (`u32::MAX`: forever); the kernel removes the address when `valid` runs out.
pub fn add_addr6_lifetimes_msg(
    seq: u32,
    index: u32,
    address: std::net::Ipv6Addr,
    prefix_len: u8,
    valid: u32,
    preferred: u32,
) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut cache = [0u8; 16]; // struct ifa_cacheinfo: prefered, valid, cstamp, tstamp
    cache[0..4].copy_from_slice(&preferred.min(valid).to_ne_bytes());
    cache[4..8].copy_from_slice(&valid.to_ne_bytes());
    Msg::new(RTM_NEWADDR, flags, seq, &ifaddrmsg6(prefix_len, index, RT_SCOPE_UNIVERSE))
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .attr(IFA_CACHEINFO, &cache)
        .finish()
}

/// `RTM_DELADDR` of an IPv6 address.
pub fn del_addr6_msg(seq: u32, index: u32, address: std::net::Ipv6Addr, prefix_len: u8) -> Vec<u8> {
    let scope = if (address.segments()[0] & 0xffc0) == 0xfe80 { RT_SCOPE_LINK } else { RT_SCOPE_UNIVERSE };
    Msg::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq, &ifaddrmsg6(prefix_len, index, scope))
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .finish()
}

/// Parse an `RTM_NEWADDR` payload; None for a non-IPv6 or address-less one. The flags are
/// `IFA_FLAGS` when present (32 bits), else the header's 8.
pub fn parse_addr6(payload: &[u8]) -> Option<Addr6> {
    if *payload.first()? != AF_INET6 {
        return None;
    }
    let prefix_len = *payload.get(1)?;
    let mut flags = u32::from(*payload.get(2)?);
    let index = ne_u32(payload, 4)?;
    let (mut local, mut address) = (None, None);
    let v6 = |d: &[u8]| <[u8; 16]>::try_from(d).ok().map(std::net::Ipv6Addr::from);
    for (kind, data) in attrs(payload.get(IFADDRMSG..)?) {
        match kind {
            IFA_LOCAL => local = v6(data),
            IFA_ADDRESS => address = v6(data),
            IFA_FLAGS => flags = ne_u32(data, 0).unwrap_or(flags),
            _ => {}
        }
    }
    Some(Addr6 { index, address: local.or(address)?, prefix_len, flags })
}

impl Rtnl {
    /// IPv6 addresses, all of them or those of link `index`.
    pub fn addrs6(&mut self, index: Option<u32>) -> Result<Vec<Addr6>, Error> {
        let seq = self.next_seq();
        let raw = self
            .dump(&get_addrs6_msg(seq), seq, RTM_NEWADDR)
            .map_err(|e| nl_err("list IPv6 addresses", "*", e))?;
        Ok(raw.iter().filter_map(|p| parse_addr6(p)).filter(|a| index.is_none_or(|i| a.index == i)).collect())
    }

    /// Add (or refresh the lifetimes of) an IPv6 address.
    pub fn add_addr6_lifetimes(
        &mut self,
        link: &Link,
        address: std::net::Ipv6Addr,
        prefix_len: u8,
        valid: u32,
        preferred: u32,
    ) -> Result<(), Error> {
        let seq = self.next_seq();
        self.request(&add_addr6_lifetimes_msg(seq, link.index, address, prefix_len, valid, preferred), seq)
            .map_err(|e| nl_err(format!("add address {address}/{prefix_len}"), &link.name, e))
    }

    /// Delete an IPv6 address; one already gone is not an error.
    pub fn del_addr6_if_present(
        &mut self,
        link: &Link,
        address: std::net::Ipv6Addr,
        prefix_len: u8,
    ) -> Result<(), Error> {
        let seq = self.next_seq();
        match self.request(&del_addr6_msg(seq, link.index, address, prefix_len), seq) {
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Ok(()),
            other => {
                other.map_err(|e| nl_err(format!("delete address {address}/{prefix_len}"), &link.name, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(b: &[u8]) -> (u32, u16, u16, u32) {
        (ne_u32(b, 0).unwrap(), ne_u16(b, 4).unwrap(), ne_u16(b, 6).unwrap(), ne_u32(b, 8).unwrap())
    }

    /// Hex (spaces ignored) to bytes. The fixtures below are what `ip` (iproute2 6.x) sent,
    /// read with `strace -e trace=sendmsg -xx` (see each test), with sequence number 1; on
    /// this little-endian test host.
    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn virtual_links_encode_as_iproute2_does() {
        // ip link add link e0 name v7 type vlan id 7   (e0 is index 3)
        let vlan = hex("48000000 1000 0506 01000000 00000000  00000000 00000000 00000000 00000000
             0800 0500 03000000  0700 0300 76370000
             1800 1200 0800 0100 766c616e 0c00 0200 0600 0100 0700 0000");
        assert_eq!(new_vlan_msg(1, "v7", 3, 7), vlan);
        // ip link add b1 type bond mode active-backup miimon 100 updelay 200 downdelay 200 min_links 1
        let mii = hex("60000000 1000 0506 01000000 00000000  00000000 00000000 00000000 00000000
             0700 0300 62310000
             3800 1200 0800 0100 626f6e64 2c00 0200
               0500 0100 01000000  0800 0300 64000000  0800 0400 c8000000  0800 0500 c8000000
               0800 1200 01000000");
        let bond = Bond {
            monitor: Some(BondMonitor::Mii { frequency_ms: 100, updelay_ms: 200, downdelay_ms: 200 }),
            min_links: Some(1),
        };
        assert_eq!(new_bond_msg(1, "b1", &bond), mii);
        // ip link add b2 type bond mode active-backup arp_interval 250 arp_validate all
        //   arp_ip_target 10.0.0.1,10.0.0.2
        let arp = hex("64000000 1000 0506 01000000 00000000  00000000 00000000 00000000 00000000
             0700 0300 62320000
             3c00 1200 0800 0100 626f6e64 3000 0200
               0500 0100 01000000  0800 0700 fa000000  0800 0900 03000000
               1400 0800 0800 0000 0a000001 0800 0100 0a000002");
        let bond = Bond {
            monitor: Some(BondMonitor::Arp {
                interval_ms: 250,
                validate: ArpValidate::All,
                targets: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
            }),
            min_links: None,
        };
        assert_eq!(new_bond_msg(1, "b2", &bond), arp);
        // ip link set e1 master b1 (e1 index 4, b1 index 6); ip link set e1 down; ip link del e1
        let ifi = |index: u8, flags: u8, change: u8| {
            format!("00000000 {index:02x}000000 {flags:02x}000000 {change:02x}000000")
        };
        assert_eq!(
            set_master_msg(1, 4, 6),
            hex(&format!("28000000 1000 0500 01000000 00000000 {} 0800 0a00 06000000", ifi(4, 0, 0)))
        );
        assert_eq!(
            set_down_msg(1, 4),
            hex(&format!("20000000 1000 0500 01000000 00000000 {}", ifi(4, 0, 1)))
        );
        assert_eq!(
            del_link_msg(1, 4),
            hex(&format!("20000000 1100 0500 01000000 00000000 {}", ifi(4, 0, 0)))
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn ipv6_addresses_and_routes_encode_as_iproute2_does() {
        // ip addr add fd00:7::2/64 dev e0 (index 3); Berth asks create-or-replace (0x505)
        // where ip asks create-exclusive (0x605).
        let fd7_2 = "fd000007000000000000000000000002";
        let addr = hex(&format!(
            "40000000 1400 0505 01000000 00000000  0a400000 03000000
             1400 0200 {fd7_2}  1400 0100 {fd7_2}"
        ));
        assert_eq!(add_addr6_msg(1, 3, "fd00:7::2".parse().unwrap(), 64), addr);
        // ip route add fd00:8::/64 via fd00:7::1 dev e0 metric 50 proto static
        let route6 = hex("54000000 1800 0505 01000000 00000000  0a400000 fe040001 00000000
             1400 0100 fd000008000000000000000000000000
             1400 0500 fd000007000000000000000000000001
             0800 0600 32000000  0800 0400 03000000");
        let r = RouteSpec {
            dst: "fd00:8::".parse().unwrap(),
            dst_len: 64,
            gateway: Some("fd00:7::1".parse().unwrap()),
            oif: 3,
            metric: Some(50),
            prefsrc: None,
            table: u32::from(RT_TABLE_MAIN),
            proto: RouteProto::Static,
        };
        assert_eq!(route_msg(1, &r), route6);
        // ip route add 10.8.0.0/16 via 10.9.0.1 dev e0 metric 50 src 10.9.0.2 proto static
        let route4 = hex("44000000 1800 0505 01000000 00000000  02100000 fe040001 00000000
             0800 0100 0a080000  0800 0500 0a090001  0800 0600 32000000  0800 0700 0a090002
             0800 0400 03000000");
        let r4 = RouteSpec {
            dst: "10.8.0.0".parse().unwrap(),
            dst_len: 16,
            gateway: Some("10.9.0.1".parse().unwrap()),
            prefsrc: Some("10.9.0.2".parse().unwrap()),
            ..r
        };
        assert_eq!(route_msg(1, &r4), route4);
        // On-link (no gateway) is scope link; the default route has no RTA_DST; a table past
        // 255 goes in RTA_TABLE with rtm_table RT_TABLE_UNSPEC.
        let onlink = route_msg(
            1,
            &RouteSpec {
                dst: "::".parse().unwrap(),
                dst_len: 0,
                gateway: None,
                metric: None,
                table: 1000,
                ..r
            },
        );
        let rt = &onlink[HDR..HDR + RTMSG];
        assert_eq!(&rt[..8], &[AF_INET6, 0, 0, 0, RT_TABLE_UNSPEC, 4, RT_SCOPE_LINK, RTN_UNICAST]);
        assert_eq!(
            attrs(&onlink[HDR + RTMSG..]),
            vec![(RTA_OIF, &3u32.to_ne_bytes()[..]), (RTA_TABLE, &1000u32.to_ne_bytes()[..])]
        );
    }

    #[test]
    fn headers_of_built_requests() {
        let add_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let cases: Vec<(&str, Vec<u8>, u16, u16, usize)> = vec![
            ("getlink", get_links_msg(7), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, HDR + IFINFOMSG),
            ("setup", set_up_msg(7, 2), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, HDR + IFINFOMSG),
            ("mtu", set_mtu_msg(7, 2, 1400), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, HDR + IFINFOMSG + 8),
            (
                "addaddr /24",
                add_addr_msg(7, 2, Ipv4Addr::new(10, 0, 2, 15), 24),
                RTM_NEWADDR,
                add_flags,
                HDR + IFADDRMSG + 3 * 8,
            ),
            (
                "addaddr /32 has no broadcast",
                add_addr_msg(7, 2, Ipv4Addr::new(10, 0, 2, 15), 32),
                RTM_NEWADDR,
                add_flags,
                HDR + IFADDRMSG + 2 * 8,
            ),
            (
                "deladdr",
                del_addr_msg(7, 2, Ipv4Addr::new(10, 0, 2, 15), 24),
                RTM_DELADDR,
                NLM_F_REQUEST | NLM_F_ACK,
                HDR + IFADDRMSG + 2 * 8,
            ),
            ("getaddr", get_addrs_msg(7), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, HDR + IFADDRMSG),
            ("getroute", get_routes_msg(7), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, HDR + RTMSG),
            (
                "route",
                default_route_msg(7, 2, Ipv4Addr::new(10, 0, 2, 2), RouteProto::Dhcp, false),
                RTM_NEWROUTE,
                add_flags,
                HDR + RTMSG + 2 * 8,
            ),
        ];
        for (name, msg, kind, flags, len) in cases {
            assert_eq!(hdr(&msg), (len as u32, kind, flags, 7), "{name}");
            assert_eq!(msg.len(), len, "{name}");
        }
    }

    #[test]
    fn add_addr_carries_local_address_and_broadcast() {
        let msg = add_addr_msg(1, 3, Ipv4Addr::new(10, 0, 2, 15), 24);
        let fixed = &msg[HDR..HDR + IFADDRMSG];
        assert_eq!(&fixed[..4], &[AF_INET, 24, 0, RT_SCOPE_UNIVERSE]);
        assert_eq!(ne_u32(fixed, 4), Some(3));
        let a = attrs(&msg[HDR + IFADDRMSG..]);
        assert_eq!(
            a,
            vec![
                (IFA_LOCAL, &[10, 0, 2, 15][..]),
                (IFA_ADDRESS, &[10, 0, 2, 15][..]),
                (IFA_BROADCAST, &[10, 0, 2, 255][..]),
            ]
        );
    }

    #[test]
    fn default_route_fields() {
        let cases = [(false, 0u32, RouteProto::Dhcp), (true, RTNH_F_ONLINK, RouteProto::Static)];
        for (onlink, flags, proto) in cases {
            let msg = default_route_msg(1, 4, Ipv4Addr::new(192, 168, 1, 1), proto, onlink);
            let rt = &msg[HDR..HDR + RTMSG];
            assert_eq!(&rt[..8], &[AF_INET, 0, 0, 0, RT_TABLE_MAIN, proto as u8, 0, RTN_UNICAST]);
            assert_eq!(ne_u32(rt, 8), Some(flags));
            let a = attrs(&msg[HDR + RTMSG..]);
            assert_eq!(a[0], (RTA_GATEWAY, &[192, 168, 1, 1][..]));
            assert_eq!(a[1], (RTA_OIF, &4u32.to_ne_bytes()[..]));
        }
    }

    #[test]
    fn broadcast_and_mask() {
        let cases = [
            ((10, 0, 2, 15), 24, Some((10, 0, 2, 255)), 0xffff_ff00),
            ((10, 0, 2, 15), 8, Some((10, 255, 255, 255)), 0xff00_0000),
            ((192, 168, 7, 1), 30, Some((192, 168, 7, 3)), 0xffff_fffc),
            ((192, 168, 7, 1), 31, None, 0xffff_fffe),
            ((192, 168, 7, 1), 32, None, 0xffff_ffff),
            ((192, 168, 7, 1), 0, Some((255, 255, 255, 255)), 0),
        ];
        for ((a, b, c, d), p, want, mask) in cases {
            let got = broadcast(Ipv4Addr::new(a, b, c, d), p);
            assert_eq!(got, want.map(|(a, b, c, d)| Ipv4Addr::new(a, b, c, d)), "/{p}");
            assert_eq!(prefix_mask(p), mask, "/{p}");
        }
    }

    /// Build a message as the kernel would send it.
    fn kernel_msg(kind: u16, flags: u16, seq: u32, fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = Msg::new(kind, flags, seq, fixed);
        for (k, d) in attrs {
            m = m.attr(*k, d);
        }
        m.finish()
    }

    #[test]
    fn parses_links() {
        let mut fixed = ifinfomsg(AF_UNSPEC, 2, IFF_UP | IFF_LOWER_UP, 0);
        fixed[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        let eth = kernel_msg(
            RTM_NEWLINK,
            2,
            9,
            &fixed,
            &[
                (IFLA_IFNAME, b"eth0\0"),
                (IFLA_MTU, &1500u32.to_ne_bytes()),
                (IFLA_ADDRESS, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            ],
        );
        let mut fixed = ifinfomsg(AF_UNSPEC, 1, IFF_LOOPBACK, 0);
        fixed[2..4].copy_from_slice(&ARPHRD_LOOPBACK.to_ne_bytes());
        let lo = kernel_msg(RTM_NEWLINK, 2, 9, &fixed, &[(IFLA_IFNAME, b"lo\0"), (IFLA_ADDRESS, &[0; 6])]);
        let datagram = [eth, lo].concat();
        let msgs = split(&datagram);
        assert_eq!(msgs.len(), 2);
        let eth = parse_link(msgs[0].payload).unwrap();
        assert_eq!(eth.name, "eth0");
        assert_eq!(eth.index, 2);
        assert_eq!(eth.kind, LinkKind::Ethernet);
        assert!(eth.is_up() && eth.has_carrier() && !eth.is_loopback());
        assert_eq!(eth.mac_string(), "52:54:00:12:34:56");
        assert_eq!(eth.mtu, Some(1500));
        let lo = parse_link(msgs[1].payload).unwrap();
        assert!(lo.is_loopback() && !lo.is_up());
        assert_eq!(lo.kind, LinkKind::Loopback);
    }

    #[test]
    fn parses_addrs_and_routes() {
        let a = kernel_msg(
            RTM_NEWADDR,
            2,
            1,
            &ifaddrmsg(8, 1),
            &[(IFA_ADDRESS, &[127, 0, 0, 1]), (IFA_LOCAL, &[127, 0, 0, 1])],
        );
        let parsed = parse_addr(split(&a)[0].payload).unwrap();
        assert_eq!(parsed, Addr { index: 1, address: Ipv4Addr::LOCALHOST, prefix_len: 8 });

        let mut rt = [0u8; RTMSG];
        rt[0] = AF_INET;
        rt[4] = RT_TABLE_MAIN;
        let r = kernel_msg(
            RTM_NEWROUTE,
            2,
            1,
            &rt,
            &[
                (RTA_TABLE, &254u32.to_ne_bytes()),
                (RTA_GATEWAY, &[10, 0, 2, 2]),
                (RTA_OIF, &2u32.to_ne_bytes()),
            ],
        );
        let route = parse_route(split(&r)[0].payload).unwrap();
        assert!(route.is_default());
        assert_eq!(route.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(route.oif, Some(2));
        assert_eq!(route.table, 254);

        // IPv6 payloads are not ours.
        assert_eq!(parse_addr(&[10, 64, 0, 0, 1, 0, 0, 0]), None);
        assert_eq!(parse_route(&[10; RTMSG]), None);
    }

    #[test]
    fn acks() {
        let orig = set_up_msg(5, 2);
        // (name, error flags, payload, expected)
        let mut capped_with_text = (-17i32).to_ne_bytes().to_vec();
        capped_with_text.extend_from_slice(&orig[..HDR]);
        capped_with_text
            .extend_from_slice(&Msg::new(0, 0, 0, &[]).attr(NLMSGERR_ATTR_MSG, b"File exists\0").buf[HDR..]);
        let mut full_echo = (-19i32).to_ne_bytes().to_vec();
        full_echo.extend_from_slice(&orig);
        full_echo
            .extend_from_slice(&Msg::new(0, 0, 0, &[]).attr(NLMSGERR_ATTR_MSG, b"no device\0").buf[HDR..]);
        let cases: Vec<(&str, u16, Vec<u8>, Option<Ack>)> = vec![
            ("plain ack", 0, 0i32.to_ne_bytes().to_vec(), Some(Ack { errno: 0, message: None })),
            ("errno only", 0, (-1i32).to_ne_bytes().to_vec(), Some(Ack { errno: 1, message: None })),
            (
                "capped, with text",
                NLM_F_CAPPED | NLM_F_ACK_TLVS,
                capped_with_text,
                Some(Ack { errno: 17, message: Some("File exists".into()) }),
            ),
            (
                "full echo, with text",
                NLM_F_ACK_TLVS,
                full_echo,
                Some(Ack { errno: 19, message: Some("no device".into()) }),
            ),
            ("truncated", 0, vec![1, 2], None),
            ("i32::MIN", 0, i32::MIN.to_ne_bytes().to_vec(), Some(Ack { errno: i32::MAX, message: None })),
        ];
        for (name, flags, payload, want) in cases {
            assert_eq!(parse_ack(flags, &payload), want, "{name}");
        }
        let e = ack_result(NLM_F_CAPPED | NLM_F_ACK_TLVS, &{
            let mut p = (-17i32).to_ne_bytes().to_vec();
            p.extend_from_slice(&orig[..HDR]);
            p.extend_from_slice(
                &Msg::new(0, 0, 0, &[]).attr(NLMSGERR_ATTR_MSG, b"Address exists\0").buf[HDR..],
            );
            p
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("Address exists"), "{e}");
    }

    #[test]
    fn split_stops_at_malformed_headers() {
        let good = set_up_msg(1, 1);
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("empty", vec![], 0),
            ("short", vec![1, 2, 3], 0),
            ("one", good.clone(), 1),
            ("two", [good.clone(), good.clone()].concat(), 2),
            ("len below header", [&8u32.to_ne_bytes()[..], &[0; 12]].concat(), 0),
            ("len past end", [&64u32.to_ne_bytes()[..], &[0; 12]].concat(), 0),
            ("good then junk", [good.clone(), vec![0xff; 20]].concat(), 1),
        ];
        for (name, data, n) in cases {
            assert_eq!(split(&data).len(), n, "{name}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256), flags in 0u16..0x400) {
            for m in split(&data) {
                let _ = parse_link(m.payload);
                let _ = parse_addr(m.payload);
                let _ = parse_route(m.payload);
                let _ = parse_ack(flags, m.payload);
            }
            let _ = parse_link(&data);
            let _ = parse_addr(&data);
            let _ = parse_route(&data);
            let _ = parse_ack(flags, &data);
            let _ = attrs(&data);
        }
    }
}
