//! Networking for PID 1: loopback up, the primary interface configured by DHCPv4 or
//! statically, a default route, and the text of /etc/resolv.conf; and net.toml's other
//! devices ([`setup_devices`], [`finish_primary`], [`spawn_secondary_dhcp`]: VLANs,
//! active-backup bonds, static IPv4/IPv6 addresses, routes, DHCPv4 beside the primary; see
//! `docs/networking.md`).
//!
//! [`bring_up`] does it in order: open rtnetlink ([`netlink`]), set `lo` up and make sure it
//! has 127.0.0.1/8 (the kernel adds it when lo goes up; we verify and add it if missing), pick
//! the interface (the named one, or the Ethernet link with the lowest index), set it up, wait
//! briefly for carrier, then either run the DHCP client ([`dhcp`]) or apply the static address.
//! The result, [`Configured`], feeds [`resolv_conf`] and, for DHCP, [`spawn_renewal`], whose
//! thread ([`run_forever`]) renews at T1, rebinds at T2, and starts over if the lease is lost.
//!
//! Why the DHCP client needs no packet socket: see `sys::net::dhcp_socket`. Its limits:
//! - Servers must answer to the broadcast address before we hold one (we set the broadcast
//!   flag; QEMU's slirp — 10.0.2.15/24, router 10.0.2.2, DNS 10.0.2.3 — always broadcasts).
//! - Reverse-path filtering (`rp_filter` 1 or 2 on `all` or the interface) makes the kernel drop
//!   broadcast replies from a server it has no route to, which is every server before we have
//!   an address. The kernel default is 0 and Berth sets nothing else; [`bring_up`] logs a
//!   warning when it finds it on.
//! - This module owns the interface's IPv4 configuration: applying a lease or a static address
//!   deletes every other IPv4 address on it. DHCPv4 only (no DHCPv6 yet); the default route
//!   and DNS come from the primary interface's lease only (other interfaces' leases give an
//!   address); the DHCP hostname is reported in the lease, not applied.
//! - Nothing is released on shutdown (DHCPRELEASE), as with most clients: the lease just runs
//!   out, and the next boot usually gets the same address back.

pub mod dhcp;
pub mod dhcp6;
pub mod netlink;
#[cfg(test)]
mod netns_lab;
#[cfg(test)]
mod netns_test;
pub mod nettoml;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use dhcp::Lease;
pub use netlink::Link;

use dhcp::{Answer, Client, State, Timing, UdpTransport};
use netlink::{RouteProto, Rtnl};

/// How to configure the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetConfig {
    /// DHCPv4 on `interface`, or on the first Ethernet link (lowest index) when None.
    Dhcp { interface: Option<String> },
    /// A fixed address on `interface` (first Ethernet link when None).
    Static {
        interface: Option<String>,
        address: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
    },
}

/// What [`bring_up`] configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Configured {
    Dhcp { link: Link, lease: Lease },
    Static { link: Link, address: Ipv4Addr, prefix_len: u8, gateway: Option<Ipv4Addr>, dns: Vec<Ipv4Addr> },
}

impl Configured {
    pub fn link(&self) -> &Link {
        match self {
            Configured::Dhcp { link, .. } | Configured::Static { link, .. } => link,
        }
    }

    /// The interface's address and prefix length.
    pub fn address(&self) -> (Ipv4Addr, u8) {
        match self {
            Configured::Dhcp { lease, .. } => (lease.address, lease.prefix_len),
            Configured::Static { address, prefix_len, .. } => (*address, *prefix_len),
        }
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        match self {
            Configured::Dhcp { lease, .. } => lease.router,
            Configured::Static { gateway, .. } => *gateway,
        }
    }

    pub fn dns(&self) -> &[Ipv4Addr] {
        match self {
            Configured::Dhcp { lease, .. } => &lease.dns,
            Configured::Static { dns, .. } => dns,
        }
    }

    pub fn domain(&self) -> Option<&str> {
        match self {
            Configured::Dhcp { lease, .. } => lease.domain.as_deref(),
            Configured::Static { .. } => None,
        }
    }
}

/// Why the network could not be configured.
#[derive(Debug)]
pub enum Error {
    /// The kernel refused (or never answered) a netlink request.
    Netlink { op: String, interface: String, cause: io::Error },
    /// No link matches the configuration.
    NoInterface { wanted: Option<String>, available: Vec<String> },
    /// The configuration cannot be applied to this interface.
    Invalid { interface: String, reason: String },
    /// The DHCP socket could not be opened or read.
    DhcpSocket { interface: String, cause: io::Error },
    /// No server answered in time.
    DhcpTimeout {
        interface: String,
        phase: dhcp::Phase,
        tries: u32,
        waited: Duration,
        last_send_error: Option<String>,
    },
    /// The server kept refusing the address it offered.
    DhcpNak { interface: String, server: Ipv4Addr, message: Option<String> },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Netlink { op, interface, cause } => {
                write!(f, "network: could not {op} on {interface}: {cause}")
            }
            Error::NoInterface { wanted: Some(name), available } => write!(
                f,
                "network: no interface named '{name}' (have: {}); fix the interface name in the settings",
                available.join(", ")
            ),
            Error::NoInterface { wanted: None, available } => write!(
                f,
                "network: no Ethernet interface found (have: {}); is the NIC's driver in the kernel?",
                available.join(", ")
            ),
            Error::Invalid { interface, reason } => {
                write!(f, "network: cannot configure {interface}: {reason}")
            }
            Error::DhcpSocket { interface, cause } => {
                write!(f, "dhcp: cannot use the DHCP socket on {interface}: {cause}")
            }
            Error::DhcpTimeout { interface, phase, tries, waited, last_send_error } => {
                write!(f, "dhcp: {interface}: {phase} ({tries} tries over {:.1}s)", waited.as_secs_f64())?;
                if let Some(e) = last_send_error {
                    write!(f, "; last send failed: {e}")?;
                }
                write!(f, "; check the link has a DHCP server, or configure a static address")
            }
            Error::DhcpNak { interface, server, message } => write!(
                f,
                "dhcp: {interface}: server {server} refused the address it offered ({})",
                message.as_deref().unwrap_or("no reason given")
            ),
        }
    }
}

impl std::error::Error for Error {}

/// How long [`bring_up`] waits for carrier before starting DHCP anyway.
const CARRIER_WAIT: Duration = Duration::from_secs(3);
/// Pause between acquisition attempts after a lease is lost.
const REACQUIRE_PAUSE: Duration = Duration::from_secs(30);

/// Virtual links that are never the machine's own way out unless named: they exist without a
/// NIC (the kernel makes `bond0` at boot when bonding is built in) or sit on top of one. A
/// veth is eligible: in a network namespace it is the NIC.
const NEVER_DEFAULT: &[&str] = &["bond", "bridge", "dummy", "vlan", "macvlan", "ipvlan", "team"];

/// Pick the interface: the one named `wanted`, or the non-loopback Ethernet link with the
/// lowest index, leaving out bonds, bridges and the like ([`NEVER_DEFAULT`]).
pub fn choose_link(links: &[Link], wanted: Option<&str>) -> Result<Link, Error> {
    let found = match wanted {
        Some(name) => links.iter().find(|l| l.name == name),
        None => links
            .iter()
            .filter(|l| l.kind == netlink::LinkKind::Ethernet && !l.is_loopback())
            .filter(|l| !l.virtual_kind.as_deref().is_some_and(|k| NEVER_DEFAULT.contains(&k)))
            .min_by_key(|l| l.index),
    };
    found.cloned().ok_or_else(|| Error::NoInterface {
        wanted: wanted.map(str::to_string),
        available: links.iter().map(|l| l.name.clone()).collect(),
    })
}

/// Set `lo` up and make sure it has 127.0.0.1/8.
fn loopback_up(nl: &mut Rtnl, links: &[Link]) -> Result<(), Error> {
    let lo = links.iter().find(|l| l.is_loopback()).ok_or_else(|| Error::NoInterface {
        wanted: Some("lo".to_string()),
        available: links.iter().map(|l| l.name.clone()).collect(),
    })?;
    nl.set_up(lo)?;
    let has = nl.addrs(Some(lo.index))?.iter().any(|a| a.address == Ipv4Addr::LOCALHOST && a.prefix_len == 8);
    if !has {
        log::warn!("network: {} came up without 127.0.0.1/8; adding it", lo.name);
        nl.add_addr(lo, Ipv4Addr::LOCALHOST, 8)?;
    }
    Ok(())
}

/// Wait up to `limit` for carrier on `link`; returns the link as last seen.
fn wait_for_carrier(nl: &mut Rtnl, link: &Link, limit: Duration) -> Result<Link, Error> {
    let start = Instant::now();
    loop {
        let now = nl.links()?.into_iter().find(|l| l.index == link.index);
        let Some(now) = now else {
            return Err(Error::NoInterface { wanted: Some(link.name.clone()), available: Vec::new() });
        };
        if now.has_carrier() {
            return Ok(now);
        }
        if start.elapsed() >= limit {
            log::warn!("network: {} has no carrier after {limit:?}; trying anyway", link.name);
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Warn when reverse-path filtering would drop broadcast DHCP replies (see the module docs).
fn warn_rp_filter(interface: &str) {
    let read = |which: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{which}/rp_filter"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let value = read("all").max(read(interface));
    if value != 0 {
        log::warn!(
            "dhcp: rp_filter is {value} for {interface}: the kernel may drop the server's broadcast replies"
        );
    }
}

/// Make `link` carry exactly `address/prefix_len` (other IPv4 addresses are deleted), with the
/// given MTU and default route.
fn configure(
    nl: &mut Rtnl,
    link: &Link,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    mtu: Option<u16>,
    proto: RouteProto,
) -> Result<(), Error> {
    for a in nl.addrs(Some(link.index))? {
        if (a.address, a.prefix_len) != (address, prefix_len) {
            nl.del_addr_if_present(link, a.address, a.prefix_len)?;
        }
    }
    nl.add_addr(link, address, prefix_len)?;
    if let Some(mtu) = mtu.map(u32::from) {
        if link.mtu != Some(mtu) {
            nl.set_mtu(link, mtu)?;
        }
    }
    if let Some(gw) = gateway {
        nl.default_route(link, gw, proto)?;
    }
    Ok(())
}

/// Apply `lease` to `link`, with its router as the default route when `default_route`.
fn apply_lease(nl: &mut Rtnl, link: &Link, lease: &Lease, default_route: bool) -> Result<(), Error> {
    let router = lease.router.filter(|_| default_route);
    configure(nl, link, lease.address, lease.prefix_len, router, lease.mtu, RouteProto::Dhcp)
}

fn check_static(
    interface: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), Error> {
    let bad = |reason: String| Err(Error::Invalid { interface: interface.to_string(), reason });
    if !(1..=32).contains(&prefix_len) {
        return bad(format!("prefix length /{prefix_len} is not between 1 and 32"));
    }
    let unusable =
        |a: Ipv4Addr| a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback();
    if unusable(address) {
        return bad(format!("{address} cannot be an interface address"));
    }
    match gateway {
        Some(gw) if unusable(gw) || gw == address => bad(format!("{gw} cannot be the gateway")),
        _ => Ok(()),
    }
}

/// Bring up loopback and configure one interface as `config` says.
/// Bring the loopback interface up (127.0.0.1/8 and ::1 come with it).
pub fn loopback() -> Result<(), Error> {
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    loopback_up(&mut nl, &links)
}

pub fn bring_up(config: &NetConfig) -> Result<Configured, Error> {
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    loopback_up(&mut nl, &links)?;
    let wanted = match config {
        NetConfig::Dhcp { interface } | NetConfig::Static { interface, .. } => interface.as_deref(),
    };
    let link = choose_link(&links, wanted)?;
    nl.set_up(&link)?;
    let link = wait_for_carrier(&mut nl, &link, CARRIER_WAIT)?;
    match config {
        NetConfig::Dhcp { .. } => {
            let lease = acquire(&link)?;
            apply_lease(&mut nl, &link, &lease, true)?;
            log::info!(
                "network: {} has {}/{} from {} (router {}, lease {}s)",
                link.name,
                lease.address,
                lease.prefix_len,
                lease.server,
                lease.router.map_or("none".to_string(), |r| r.to_string()),
                lease.lease_secs
            );
            Ok(Configured::Dhcp { link, lease })
        }
        NetConfig::Static { address, prefix_len, gateway, dns, .. } => {
            check_static(&link.name, *address, *prefix_len, *gateway)?;
            configure(&mut nl, &link, *address, *prefix_len, *gateway, None, RouteProto::Static)?;
            log::info!("network: {} has {address}/{prefix_len} (static)", link.name);
            Ok(Configured::Static {
                link,
                address: *address,
                prefix_len: *prefix_len,
                gateway: *gateway,
                dns: dns.clone(),
            })
        }
    }
}

fn dhcp_client(link: &Link) -> Result<Client<UdpTransport>, Error> {
    let mac = link.mac.ok_or_else(|| Error::Invalid {
        interface: link.name.clone(),
        reason: "it has no MAC address, so DHCP cannot identify it".to_string(),
    })?;
    let transport = UdpTransport::open(&link.name)
        .map_err(|cause| Error::DhcpSocket { interface: link.name.clone(), cause })?;
    Ok(Client::new(transport, &link.name, mac, Timing::default()))
}

/// Run DHCP on `link` (which must be up) until a lease is granted or the budget runs out.
fn acquire(link: &Link) -> Result<Lease, Error> {
    warn_rp_filter(&link.name);
    dhcp_client(link)?.acquire()
}

/// The text of /etc/resolv.conf for what was configured: a comment saying where it came
/// from, a `search` line when a domain is known, and up to three `nameserver` lines (the most
/// the C libraries read).
pub fn resolv_conf(up: &Configured) -> String {
    let mut out = match up {
        Configured::Dhcp { link, lease } => {
            format!("# Written by berth from the DHCP lease of {} (server {})\n", link.name, lease.server)
        }
        Configured::Static { link, .. } => {
            format!("# Written by berth from the static settings of {}\n", link.name)
        }
    };
    if let Some(domain) = up.domain() {
        out.push_str(&format!("search {domain}\n"));
    }
    if up.dns().is_empty() {
        out.push_str("# no name servers are known\n");
    }
    for ns in up.dns().iter().take(3) {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    out
}

/// Start [`run_forever`] on a thread named `dhcp`; None for a static configuration.
pub fn spawn_renewal(
    up: &Configured,
    on_change: impl FnMut(Option<&Configured>) + Send + 'static,
) -> io::Result<Option<JoinHandle<()>>> {
    let Configured::Dhcp { link, lease } = up else {
        return Ok(None);
    };
    let (link, lease) = (link.clone(), lease.clone());
    std::thread::Builder::new()
        .name("dhcp".to_string())
        .spawn(move || run_forever(link, lease, on_change))
        .map(Some)
}

/// Keep a lease for good: sleep until T1, renew with the server until T2, rebind with any
/// server until expiry; on a NAK or expiry remove the address and acquire a new lease, every
/// [`REACQUIRE_PAUSE`] until one comes. `on_change` is called with the new configuration when
/// the address, route, DNS or domain change, and with None when the lease is lost.
pub fn run_forever(link: Link, lease: Lease, on_change: impl FnMut(Option<&Configured>)) -> ! {
    keep_lease(link, Some(lease), true, on_change)
}

/// [`run_forever`]'s loop, starting with a lease or (None) by acquiring one; the lease's
/// router becomes the default route only when `default_route` (the primary interface).
fn keep_lease(
    link: Link,
    lease: Option<Lease>,
    default_route: bool,
    mut on_change: impl FnMut(Option<&Configured>),
) -> ! {
    let changed = |lease: &Lease, f: &mut dyn FnMut(Option<&Configured>)| {
        f(Some(&Configured::Dhcp { link: link.clone(), lease: lease.clone() }))
    };
    let apply = |lease: &Lease| {
        if let Err(e) = Rtnl::open().and_then(|mut nl| apply_lease(&mut nl, &link, lease, default_route)) {
            log::warn!("{e}");
        }
    };
    let lose = |f: &mut dyn FnMut(Option<&Configured>)| {
        if let Err(e) = Rtnl::open().and_then(|mut nl| nl.flush(&link)) {
            log::warn!("{e}");
        }
        f(None);
    };
    let mut current = lease;
    loop {
        let Some(lease) = current.take() else {
            match acquire(&link) {
                Ok(new) => {
                    apply(&new);
                    changed(&new, &mut on_change);
                    current = Some(new);
                }
                Err(e) => {
                    log::warn!("{e}; retrying in {REACQUIRE_PAUSE:?}");
                    std::thread::sleep(REACQUIRE_PAUSE);
                }
            }
            continue;
        };
        let now = Instant::now();
        let (rebinding, until) = match dhcp::state_at(&lease, now) {
            State::Bound(Some(t1)) => {
                std::thread::sleep(t1.saturating_duration_since(now));
                current = Some(lease);
                continue;
            }
            State::Bound(None) => {
                std::thread::sleep(Duration::from_secs(86400));
                current = Some(lease);
                continue;
            }
            State::Renewing(t2) => (false, t2),
            State::Rebinding(end) => (true, end),
            State::Expired => {
                log::warn!("dhcp: {}: the lease on {} expired", link.name, lease.address);
                lose(&mut on_change);
                continue;
            }
        };
        let wait = dhcp::retransmit_wait(now, until);
        match dhcp_client(&link).and_then(|mut c| c.renew(&lease, rebinding, wait)) {
            Ok(Some(Answer::Ack(new))) => {
                apply(&new);
                if new.differs_in_config(&lease) {
                    changed(&new, &mut on_change);
                }
                log::info!("dhcp: {}: renewed {} for {}s", link.name, new.address, new.lease_secs);
                current = Some(new);
            }
            Ok(Some(Answer::Nak { server, message })) => {
                log::warn!(
                    "dhcp: {}: {server} refused to renew {}: {}",
                    link.name,
                    lease.address,
                    message.as_deref().unwrap_or("no reason given")
                );
                lose(&mut on_change);
            }
            Ok(None) => current = Some(lease),
            Err(e) => {
                log::warn!("{e}");
                std::thread::sleep(wait);
                current = Some(lease);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// net.toml's devices

/// The kernel's options for a bond of net.toml (mode active-backup; MII or ARP monitoring as
/// given; ARP targets must be IPv4, as the driver's `arp_ip_target` is).
fn bond_options(
    min_links: Option<u32>,
    monitoring: Option<&nettoml::Monitoring>,
) -> Result<netlink::Bond, String> {
    use netlink::{ArpValidate, BondMonitor};
    let monitor = match monitoring {
        None => None,
        Some(nettoml::Monitoring::Mii { frequency_ms, updelay_ms, downdelay_ms }) => Some(BondMonitor::Mii {
            frequency_ms: *frequency_ms,
            updelay_ms: *updelay_ms,
            downdelay_ms: *downdelay_ms,
        }),
        Some(nettoml::Monitoring::Arp { interval_ms, validate, targets }) => {
            let validate = match validate.as_str() {
                "active" => ArpValidate::Active,
                "backup" => ArpValidate::Backup,
                "all" => ArpValidate::All,
                _ => ArpValidate::None,
            };
            let targets = targets
                .iter()
                .map(|t| match t {
                    std::net::IpAddr::V4(a) => Ok(*a),
                    std::net::IpAddr::V6(a) => Err(format!("ARP target {a} is not IPv4")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(BondMonitor::Arp { interval_ms: *interval_ms, validate, targets })
        }
    };
    Ok(netlink::Bond { monitor, min_links })
}

fn find<'a>(links: &'a [Link], name: &str) -> Result<&'a Link, Error> {
    links.iter().find(|l| l.name == name).ok_or_else(|| Error::NoInterface {
        wanted: Some(name.to_string()),
        available: links.iter().map(|l| l.name.clone()).collect(),
    })
}

/// Create the virtual link `s` names (a bond with its members, or a VLAN on its parent).
/// A link of that name and kind that is already there (the kernel makes `bond0` at boot when
/// bonding is built in; a network task started again finds its own) is deleted first, so the
/// options are net.toml's.
fn create_virtual(nl: &mut Rtnl, s: &nettoml::Setup) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid { interface: s.name.clone(), reason };
    let kind = match &s.kind {
        nettoml::Kind::Bond { .. } => "bond",
        nettoml::Kind::Vlan { .. } => "vlan",
        nettoml::Kind::Interface => return Ok(()),
    };
    if let Some(old) = nl.links()?.into_iter().find(|l| l.name == s.name) {
        if old.virtual_kind.as_deref() != Some(kind) {
            return Err(invalid(format!("a link of that name exists and is not a {kind}")));
        }
        nl.del_link(&old)?;
    }
    match &s.kind {
        nettoml::Kind::Bond { interfaces, min_links, monitoring } => {
            let options = bond_options(*min_links, monitoring.as_ref()).map_err(invalid)?;
            nl.create_bond(&s.name, &options)?;
            let links = nl.links()?;
            let bond = find(&links, &s.name)?.clone();
            for member in interfaces {
                let m = find(&links, member)?;
                nl.set_down(m)?;
                nl.set_master(m, &bond)?;
            }
            nl.set_up(&bond)
        }
        nettoml::Kind::Vlan { device, id } => {
            let links = nl.links()?;
            let parent = find(&links, device)?.clone();
            nl.set_up(&parent)?;
            nl.create_vlan(&s.name, &parent, *id)
        }
        nettoml::Kind::Interface => Ok(()),
    }
}

/// The family of a net.toml route: its destination's, else its gateway's or source's, else
/// IPv4 when the device has an IPv4 address.
fn route_spec(s: &nettoml::Setup, r: &nettoml::Route) -> netlink::RouteSpec {
    use std::net::{IpAddr, Ipv6Addr};
    let (dst, dst_len) = match r.to {
        nettoml::RouteTo::Net(a, p) => (a, p),
        nettoml::RouteTo::Default => {
            let v6 = match r.via.or(r.from) {
                Some(a) => a.is_ipv6(),
                None => s.static4.is_empty(),
            };
            (if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) }, 0)
        }
    };
    netlink::RouteSpec {
        dst,
        dst_len,
        gateway: r.via,
        oif: 0,
        metric: r.metric,
        prefsrc: r.from,
        table: u32::from(netlink::RT_TABLE_MAIN),
        proto: RouteProto::Static,
    }
}

/// Set device `s` up with its static addresses (added beside what is there) and routes.
fn configure_device(nl: &mut Rtnl, s: &nettoml::Setup) -> Result<(), Error> {
    let links = nl.links()?;
    let link = find(&links, &s.name)?.clone();
    nl.set_up(&link)?;
    for (a, p) in &s.static4 {
        check_static(&s.name, *a, *p, None)?;
        nl.add_addr(&link, *a, *p)?;
    }
    for (a, p) in &s.static6 {
        nl.add_addr6(&link, *a, *p)?;
    }
    for r in &s.routes {
        nl.add_route(&link, &route_spec(s, r))?;
    }
    Ok(())
}

/// Set up net.toml's devices before [`bring_up`] configures the primary one: bonds (members
/// enslaved) and VLANs are created, and every device but the primary is set up with its
/// static addresses and routes. Each device's failure is logged and the others go on; the
/// names of the devices that failed are returned.
pub fn setup_devices(devices: &[nettoml::Setup]) -> Result<Vec<String>, Error> {
    let mut nl = Rtnl::open()?;
    let mut failed = vec![];
    for s in devices {
        let done = create_virtual(&mut nl, s).and_then(|()| match s.primary {
            true => Ok(()),
            false => configure_device(&mut nl, s),
        });
        match done {
            Ok(()) => log::info!("network: {} set up ({})", s.name, describe(s)),
            Err(e) => {
                log::error!("{e}");
                failed.push(s.name.clone());
            }
        }
        if s.dhcp6.is_some() && !s.primary {
            // The primary's dhcp6 runs beside DHCPv4 (`init::network`, `dhcp6`); the client
            // keeps one interface's lease and DNS, so other devices' is not applied yet.
            log::warn!("network: {}: dhcp6 not applied yet (only the primary device's)", s.name);
        }
    }
    Ok(failed)
}

/// What the primary device carries beside [`bring_up`]'s address and default route: more
/// static addresses and its other routes (added after bring_up, whose configure step keeps
/// only its own IPv4 address on the link).
pub fn finish_primary(devices: &[nettoml::Setup]) -> Result<(), Error> {
    let Some(p) = devices.iter().find(|s| s.primary) else { return Ok(()) };
    configure_device(&mut Rtnl::open()?, p)
}

fn describe(s: &nettoml::Setup) -> String {
    let mut parts = vec![];
    match &s.kind {
        nettoml::Kind::Bond { interfaces, .. } => {
            parts.push(format!("active-backup bond of {}", interfaces.join(", ")))
        }
        nettoml::Kind::Vlan { device, id } => parts.push(format!("VLAN {id} on {device}")),
        nettoml::Kind::Interface => {}
    }
    if s.primary {
        parts.push("primary".into());
    }
    if s.dhcp4 {
        parts.push("dhcp4".into());
    }
    parts.extend(s.static4.iter().map(|(a, p)| format!("{a}/{p}")));
    parts.extend(s.static6.iter().map(|(a, p)| format!("{a}/{p}")));
    if !s.routes.is_empty() {
        parts.push(format!("{} routes", s.routes.len()));
    }
    parts.join(", ")
}

/// Start DHCPv4 on every device that is not the primary and asks for it, each in a thread
/// that keeps its lease: an address on the link, no default route (that comes from the
/// primary) and no DNS servers (likewise).
pub fn spawn_secondary_dhcp(devices: &[nettoml::Setup]) {
    for s in devices.iter().filter(|s| s.dhcp4 && !s.primary) {
        let name = s.name.clone();
        let spawned = std::thread::Builder::new().name(format!("dhcp-{name}")).spawn(move || {
            let link = match Rtnl::open().and_then(|mut nl| {
                let links = nl.links()?;
                find(&links, &name).cloned()
            }) {
                Ok(l) => l,
                Err(e) => return log::error!("{e}"),
            };
            keep_lease(link, None, false, |up| {
                if let Some(Configured::Dhcp { link, lease }) = up {
                    log::info!("network: {} has {}/{} (dhcp4)", link.name, lease.address, lease.prefix_len);
                }
            })
        });
        if let Err(e) = spawned {
            log::error!("network: cannot start DHCP on {}: {e}", s.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink::{LinkKind, IFF_LOOPBACK, IFF_UP};

    fn link(index: u32, name: &str, kind: LinkKind) -> Link {
        Link {
            index,
            name: name.to_string(),
            kind,
            flags: if kind == LinkKind::Loopback { IFF_LOOPBACK | IFF_UP } else { 0 },
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            mtu: Some(1500),
            virtual_kind: None,
        }
    }

    #[test]
    fn choosing_the_interface() {
        let links = vec![
            link(1, "lo", LinkKind::Loopback),
            link(5, "eth1", LinkKind::Ethernet),
            Link { virtual_kind: Some("bond".into()), ..link(0, "bond0", LinkKind::Ethernet) },
            link(3, "sit0", LinkKind::Other(776)),
            link(2, "eth0", LinkKind::Ethernet),
        ];
        // A network namespace's NIC is a veth.
        let in_netns = vec![
            link(1, "lo", LinkKind::Loopback),
            Link { virtual_kind: Some("veth".into()), ..link(4, "eth0", LinkKind::Ethernet) },
        ];
        /// Ok(chosen name) or Err(a fragment of the error's text)
        type Want = Result<&'static str, &'static str>;
        let cases: [(&str, &[Link], Option<&str>, Want); 6] = [
            ("first ethernet by index", &links, None, Ok("eth0")),
            ("a veth", &in_netns, None, Ok("eth0")),
            ("named", &links, Some("eth1"), Ok("eth1")),
            (
                "named, missing",
                &links,
                Some("wlan0"),
                Err("no interface named 'wlan0' (have: lo, eth1, bond0, sit0, eth0)"),
            ),
            ("no ethernet", &links[..1], None, Err("no Ethernet interface found (have: lo)")),
            ("nothing", &[], None, Err("no Ethernet interface found (have: )")),
        ];
        for (name, links, wanted, want) in cases {
            match (choose_link(links, wanted), want) {
                (Ok(l), Ok(n)) => assert_eq!(l.name, n, "{name}"),
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{name}: {e}"),
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
    }

    fn dhcp_up(dns: &[&str], domain: Option<&str>) -> Configured {
        let ack_time = Instant::now();
        Configured::Dhcp {
            link: link(2, "eth0", LinkKind::Ethernet),
            lease: Lease {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                router: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: dns.iter().map(|s| s.parse().unwrap()).collect(),
                domain: domain.map(str::to_string),
                hostname: None,
                mtu: None,
                lease_secs: 86400,
                t1: 43200,
                t2: 75600,
                server: Ipv4Addr::new(10, 0, 2, 2),
                obtained: ack_time,
            },
        }
    }

    #[test]
    fn resolv_conf_text() {
        let static_up = Configured::Static {
            link: link(2, "eth0", LinkKind::Ethernet),
            address: Ipv4Addr::new(192, 168, 1, 10),
            prefix_len: 24,
            gateway: None,
            dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
        };
        let cases = [
            (
                "slirp",
                dhcp_up(&["10.0.2.3"], None),
                "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\nnameserver 10.0.2.3\n",
            ),
            (
                "domain and four servers: three kept",
                dhcp_up(&["1.1.1.1", "8.8.8.8", "9.9.9.9", "1.0.0.1"], Some("example.com")),
                "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\nsearch example.com\n\
                 nameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\n",
            ),
            (
                "no dns",
                dhcp_up(&[], None),
                "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\n# no name servers are known\n",
            ),
            (
                "static",
                static_up,
                "# Written by berth from the static settings of eth0\nnameserver 9.9.9.9\n",
            ),
        ];
        for (name, up, want) in cases {
            assert_eq!(resolv_conf(&up), want, "{name}");
        }
    }

    #[test]
    fn static_checks() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let cases = [
            ("ok", "192.168.1.10", 24, Some("192.168.1.1"), true),
            ("ok /32 no gateway", "192.168.1.10", 32, None, true),
            ("prefix 0", "192.168.1.10", 0, None, false),
            ("prefix 33", "192.168.1.10", 33, None, false),
            ("unspecified", "0.0.0.0", 24, None, false),
            ("multicast", "224.0.0.1", 24, None, false),
            ("loopback", "127.0.0.2", 8, None, false),
            ("gateway is us", "192.168.1.10", 24, Some("192.168.1.10"), false),
            ("gateway broadcast", "192.168.1.10", 24, Some("255.255.255.255"), false),
        ];
        for (name, addr, prefix, gw, ok) in cases {
            let got = check_static("eth0", ip(addr), prefix, gw.map(ip));
            assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().starts_with("network: cannot configure eth0: "), "{name}: {e}");
            }
        }
    }
}
