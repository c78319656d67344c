//! Bottlerocket's network configuration for bare metal: `net.toml` (versions 1, 2 and 3) and
//! the kernel command line's `netdog.default-interface=NAME:dhcp4,dhcp6?`, parsed and checked
//! by netdog's rules into a [`NetToml`]. What each version allows:
//!
//! - **v1**: interfaces by name; `primary` (at most one; default: the first in the file);
//!   `dhcp4`, `dhcp6`: a bool or a table `{enabled, optional}` (`dhcp4` also `route-metric`);
//!   `optional` means "ask, but do not wait for a lease".
//! - **v2** adds `static4`, `static6` = `{addresses = ["ADDR/PREFIX", ...]}` (all of that family)
//!   and `[[NAME.route]]` = `{to = "default" | CIDR, from, via, route-metric}`. Every device
//!   needs DHCP or a static address; routes need static addresses and are not allowed with DHCP.
//! - **v3** adds device ids that are MAC addresses (interfaces only), bonds
//!   (`kind = "bond"`, `mode = "active-backup"` only, `interfaces = [...]` at least one, each
//!   used once, `min-links` ≤ their count, `monitoring` by MII `{miimon-frequency-ms,
//!   miimon-updelay-ms, miimon-downdelay-ms}` or ARP `{arpmon-interval-ms, arpmon-validate,
//!   arpmon-targets}`) and VLANs (`kind = "vlan"`, `device` a name, `id` 0..=4095). Virtual
//!   devices' names are 1-15 bytes without `.`, `/` or white space.
//!
//! Unknown keys are refused, as netdog refuses them. The file is read from the BOOT partition
//! (see `docs/networking.md` for where and when). [`plan`] turns a checked file into what the
//! network code sets up: every device in order (bonds, VLANs, interfaces) and the primary
//! device's IPv4 configuration.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use toml::Value;

/// The most devices one file may configure.
pub const MAX_DEVICES: usize = 64;
/// The most bytes of net.toml read.
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Name(String),
    Mac([u8; 6]),
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Name(n) => f.write_str(n),
            DeviceId::Mac(m) => {
                write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dhcp {
    pub enabled: bool,
    pub optional: bool,
    pub route_metric: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTo {
    Default,
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub to: RouteTo,
    pub from: Option<IpAddr>,
    pub via: Option<IpAddr>,
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Monitoring {
    Mii { frequency_ms: u32, updelay_ms: u32, downdelay_ms: u32 },
    Arp { interval_ms: u32, validate: String, targets: Vec<IpAddr> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Interface,
    Bond { interfaces: Vec<String>, min_links: Option<u32>, monitoring: Option<Monitoring> },
    Vlan { device: String, id: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub kind: Kind,
    pub primary: bool,
    pub dhcp4: Option<Dhcp>,
    pub dhcp6: Option<Dhcp>,
    pub static4: Vec<(IpAddr, u8)>,
    pub static6: Vec<(IpAddr, u8)>,
    pub routes: Vec<Route>,
}

/// A checked configuration; devices in file order, exactly one of them primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetToml {
    pub version: u8,
    pub devices: Vec<Device>,
}

impl NetToml {
    pub fn primary(&self) -> Option<&Device> {
        self.devices.iter().find(|d| d.primary)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, String> {
    Err(m.into())
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains(':') { ':' } else { '-' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

fn valid_name(n: &str) -> bool {
    (1..=15).contains(&n.len()) && !n.contains(['.', '/']) && !n.chars().any(char::is_whitespace)
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    let a: IpAddr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    (p <= max).then_some((a, p))
}

/// Take the keys of `t` one by one; whatever is left is refused.
struct Fields {
    what: String,
    t: toml::map::Map<String, Value>,
}

impl Fields {
    fn new(what: String, v: &Value) -> Result<Fields, String> {
        match v {
            Value::Table(t) => Ok(Fields { what, t: t.clone() }),
            _ => err(format!("{what}: must be a table")),
        }
    }
    fn take(&mut self, k: &str) -> Option<Value> {
        self.t.remove(k)
    }
    fn bool(&mut self, k: &str) -> Result<Option<bool>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(_) => err(format!("{}.{k}: must be true or false", self.what)),
        }
    }
    fn u32(&mut self, k: &str) -> Result<Option<u32>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Integer(i)) if (0..=u32::MAX as i64).contains(&i) => Ok(Some(i as u32)),
            Some(_) => err(format!("{}.{k}: must be a whole number", self.what)),
        }
    }
    fn string(&mut self, k: &str) -> Result<Option<String>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => err(format!("{}.{k}: must be a string", self.what)),
        }
    }
    fn strings(&mut self, k: &str) -> Result<Option<Vec<String>>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Array(a)) if a.iter().all(Value::is_str) && a.len() <= MAX_DEVICES => {
                Ok(Some(a.into_iter().filter_map(|v| v.as_str().map(String::from)).collect()))
            }
            Some(_) => err(format!("{}.{k}: must be a list of strings", self.what)),
        }
    }
    fn done(self) -> Result<(), String> {
        match self.t.keys().next() {
            Some(k) => err(format!("{}: unknown key '{k}'", self.what)),
            None => Ok(()),
        }
    }
}

fn dhcp(what: String, v: Value, metric_ok: bool) -> Result<Dhcp, String> {
    match v {
        Value::Boolean(enabled) => Ok(Dhcp { enabled, ..Dhcp::default() }),
        v => {
            let mut f = Fields::new(what.clone(), &v)?;
            let enabled = f.bool("enabled")?.ok_or(format!("{what}.enabled: required"))?;
            let optional = f.bool("optional")?.unwrap_or(false);
            let route_metric = if metric_ok { f.u32("route-metric")? } else { None };
            f.done()?;
            Ok(Dhcp { enabled, optional, route_metric })
        }
    }
}

fn statics(what: String, v: Value, v6: bool) -> Result<Vec<(IpAddr, u8)>, String> {
    let mut f = Fields::new(what.clone(), &v)?;
    let list = f.strings("addresses")?.ok_or(format!("{what}.addresses: required"))?;
    f.done()?;
    if list.is_empty() {
        return err(format!("{what}.addresses: empty"));
    }
    list.iter()
        .map(|s| match parse_cidr(s) {
            Some((a, p)) if a.is_ipv6() == v6 => Ok((a, p)),
            _ => {
                err(format!("{what}.addresses: '{s}' is not an IPv{} ADDRESS/PREFIX", if v6 { 6 } else { 4 }))
            }
        })
        .collect()
}

fn route(what: String, v: &Value) -> Result<Route, String> {
    let mut f = Fields::new(what.clone(), v)?;
    let to = match f.string("to")?.as_deref() {
        Some("default") => RouteTo::Default,
        Some(c) => match parse_cidr(c) {
            Some((a, p)) => RouteTo::Net(a, p),
            None => return err(format!("{what}.to: '{c}' is neither \"default\" nor a CIDR")),
        },
        None => return err(format!("{what}.to: required")),
    };
    let ip = |f: &mut Fields, k: &str| -> Result<Option<IpAddr>, String> {
        f.string(k)?
            .map(|s| s.parse().map_err(|_| format!("{what}.{k}: '{s}' is not an IP address")))
            .transpose()
    };
    let from = ip(&mut f, "from")?;
    let via = ip(&mut f, "via")?;
    let metric = f.u32("route-metric")?;
    f.done()?;
    Ok(Route { to, from, via, metric })
}

fn monitoring(what: String, v: Value) -> Result<Monitoring, String> {
    let mut f = Fields::new(what.clone(), &v)?;
    let mii = (f.u32("miimon-frequency-ms")?, f.u32("miimon-updelay-ms")?, f.u32("miimon-downdelay-ms")?);
    let arp = (f.u32("arpmon-interval-ms")?, f.string("arpmon-validate")?, f.strings("arpmon-targets")?);
    f.done()?;
    match (mii, arp) {
        ((Some(freq), Some(up), Some(down)), (None, None, None)) => {
            if freq == 0 || up < freq || down < freq {
                return err(format!("{what}: miimon-frequency-ms must be > 0 and the delays at least it"));
            }
            Ok(Monitoring::Mii { frequency_ms: freq, updelay_ms: up, downdelay_ms: down })
        }
        ((None, None, None), (Some(interval), Some(validate), Some(targets))) => {
            if interval == 0 {
                return err(format!("{what}.arpmon-interval-ms: must be > 0"));
            }
            if !["active", "all", "backup", "none"].contains(&validate.as_str()) {
                return err(format!(
                    "{what}.arpmon-validate: '{validate}' is not active, all, backup or none"
                ));
            }
            if !(1..=16).contains(&targets.len()) {
                return err(format!("{what}.arpmon-targets: 1 to 16 addresses"));
            }
            let targets = targets
                .iter()
                .map(|t| t.parse().map_err(|_| format!("{what}.arpmon-targets: '{t}' is not an IP address")))
                .collect::<Result<_, _>>()?;
            Ok(Monitoring::Arp { interval_ms: interval, validate, targets })
        }
        _ => err(format!("{what}: either all three miimon-* keys or all three arpmon-* keys")),
    }
}

/// Parse and check net.toml's text.
pub fn parse(text: &str) -> Result<NetToml, String> {
    if text.len() > MAX_BYTES {
        return err(format!("net.toml: longer than {MAX_BYTES} bytes"));
    }
    let table: toml::Table = text.parse().map_err(|e| format!("net.toml: not TOML: {e}"))?;
    let version = match table.get("version") {
        Some(Value::Integer(v @ 1..=3)) => *v as u8,
        Some(v) => return err(format!("net.toml: version {v} is not 1, 2 or 3")),
        None => return err("net.toml: no version"),
    };
    let entries: Vec<(&String, &Value)> = table.iter().filter(|(k, _)| *k != "version").collect();
    if entries.len() > MAX_DEVICES {
        return err(format!("net.toml: more than {MAX_DEVICES} devices"));
    }
    let mut devices = vec![];
    for (key, v) in entries {
        let what = format!("net.toml [{key}]");
        let id = match parse_mac(key) {
            Some(m) if version >= 3 => DeviceId::Mac(m),
            Some(_) => return err(format!("{what}: MAC addresses as names need version 3")),
            None if (1..=15).contains(&key.len())
                && !key.contains('/')
                && !key.chars().any(char::is_whitespace) =>
            {
                DeviceId::Name(key.clone())
            }
            None => return err(format!("{what}: not an interface name")),
        };
        let mut f = Fields::new(what.clone(), v)?;
        let kind_s = f.string("kind")?;
        let kind = match kind_s.as_deref() {
            None => Kind::Interface,
            Some(k) if version < 3 => return err(format!("{what}.kind: '{k}' needs version 3")),
            Some("bond") => {
                let mode = f.string("mode")?;
                if mode.as_deref() != Some("active-backup") {
                    return err(format!("{what}.mode: must be \"active-backup\" (the one mode supported)"));
                }
                let interfaces = f.strings("interfaces")?.unwrap_or_default();
                if interfaces.is_empty() {
                    return err(format!("{what}.interfaces: at least one"));
                }
                let min_links = f.u32("min-links")?;
                if min_links.is_some_and(|m| m as usize > interfaces.len()) {
                    return err(format!("{what}.min-links: more than its interfaces"));
                }
                let monitoring =
                    f.take("monitoring").map(|m| monitoring(format!("{what}.monitoring"), m)).transpose()?;
                Kind::Bond { interfaces, min_links, monitoring }
            }
            Some("vlan") => {
                let device = f.string("device")?.ok_or(format!("{what}.device: required"))?;
                if parse_mac(&device).is_some() || !valid_name(&device) {
                    return err(format!("{what}.device: '{device}' must be an interface name, not a MAC"));
                }
                let id = match f.u32("id")? {
                    Some(i) if i < 4096 => i as u16,
                    _ => return err(format!("{what}.id: required, 0 to 4095")),
                };
                Kind::Vlan { device, id }
            }
            Some(k) => return err(format!("{what}.kind: '{k}' is not bond or vlan")),
        };
        if kind != Kind::Interface {
            match &id {
                DeviceId::Name(n) if valid_name(n) => {}
                _ => {
                    return err(format!(
                        "{what}: a virtual device's name is 1-15 bytes without . / or spaces"
                    ))
                }
            }
        }
        let primary = f.bool("primary")?.unwrap_or(false);
        let dhcp4 = f.take("dhcp4").map(|d| dhcp(format!("{what}.dhcp4"), d, true)).transpose()?;
        let dhcp6 = f.take("dhcp6").map(|d| dhcp(format!("{what}.dhcp6"), d, false)).transpose()?;
        let (mut static4, mut static6, mut routes) = (vec![], vec![], vec![]);
        if version >= 2 {
            if let Some(s) = f.take("static4") {
                static4 = statics(format!("{what}.static4"), s, false)?;
            }
            if let Some(s) = f.take("static6") {
                static6 = statics(format!("{what}.static6"), s, true)?;
            }
            match f.take("route") {
                None => {}
                Some(Value::Array(a)) if a.len() <= 64 => {
                    for (i, r) in a.iter().enumerate() {
                        routes.push(route(format!("{what}.route[{i}]"), r)?);
                    }
                }
                Some(_) => return err(format!("{what}.route: must be [[{key}.route]] tables")),
            }
        }
        f.done()?;
        let dhcp_on = dhcp4.is_some_and(|d| d.enabled) || dhcp6.is_some_and(|d| d.enabled);
        if !dhcp_on && static4.is_empty() && static6.is_empty() {
            return err(format!("{what}: needs dhcp4, dhcp6, static4 or static6"));
        }
        if !routes.is_empty() && (dhcp_on || (static4.is_empty() && static6.is_empty())) {
            return err(format!("{what}: routes need static addresses and no DHCP"));
        }
        devices.push(Device { id, kind, primary, dhcp4, dhcp6, static4, static6, routes });
    }
    check_devices(&mut devices)?;
    Ok(NetToml { version, devices })
}

fn check_devices(devices: &mut [Device]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for d in devices.iter() {
        if !names.insert(d.id.clone()) {
            return err(format!("net.toml: {} is configured twice", d.id));
        }
    }
    let mut used = BTreeSet::new();
    for d in devices.iter() {
        if let Kind::Bond { interfaces, .. } = &d.kind {
            for i in interfaces {
                if names.contains(&DeviceId::Name(i.clone())) {
                    return err(format!("net.toml: {i} is in bond {} and configured on its own", d.id));
                }
                if !used.insert(i.clone()) {
                    return err(format!("net.toml: {i} is in two bonds"));
                }
            }
        }
    }
    match devices.iter().filter(|d| d.primary).count() {
        0 => {
            if let Some(first) = devices.first_mut() {
                first.primary = true;
            }
        }
        1 => {}
        _ => return err("net.toml: more than one primary device"),
    }
    Ok(())
}

/// `netdog.default-interface=NAME:OPTS` from the kernel command line (`cmdline`'s words):
/// None without one; an error with two, or bad options (each of `dhcp4`, `dhcp6`, with `?`
/// for optional, at most once).
pub fn from_cmdline(cmdline: &str) -> Result<Option<NetToml>, String> {
    let mut found = cmdline.split_whitespace().filter_map(|w| w.strip_prefix("netdog.default-interface="));
    let Some(spec) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return err("netdog.default-interface is given twice on the kernel command line");
    }
    let what = format!("netdog.default-interface={spec}");
    let (name, opts) = spec.split_once(':').ok_or(format!("{what}: want NAME:dhcp4,dhcp6"))?;
    if !(1..=15).contains(&name.len()) || name.contains('/') {
        return err(format!("{what}: '{name}' is not an interface name"));
    }
    let (mut dhcp4, mut dhcp6) = (None, None);
    for o in opts.split(',') {
        let (o, optional) = match o.strip_suffix('?') {
            Some(o) => (o, true),
            None => (o, false),
        };
        let slot = match o {
            "dhcp4" => &mut dhcp4,
            "dhcp6" => &mut dhcp6,
            _ => return err(format!("{what}: '{o}' is not dhcp4 or dhcp6")),
        };
        if slot.is_some() {
            return err(format!("{what}: {o} given twice"));
        }
        *slot = Some(Dhcp { enabled: true, optional, route_metric: None });
    }
    Ok(Some(NetToml {
        version: 1,
        devices: vec![Device {
            id: DeviceId::Name(name.to_string()),
            kind: Kind::Interface,
            primary: true,
            dhcp4,
            dhcp6,
            static4: vec![],
            static6: vec![],
            routes: vec![],
        }],
    }))
}

/// One device as Berth sets it up, its interface names resolved (MACs through `name_of`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub name: String,
    pub kind: Kind,
    pub primary: bool,
    /// DHCPv4 on a device that is not the primary (the primary's goes through
    /// [`Plan::config`]): an address, no default route.
    pub dhcp4: bool,
    /// net.toml's `dhcp6`: the primary's runs in `net::dhcp6` (started by `init::network`);
    /// another device's is not applied yet.
    pub dhcp6: Option<Dhcp>,
    /// Static addresses to add (for the primary: those after the one in [`Plan::config`]).
    pub static4: Vec<(Ipv4Addr, u8)>,
    pub static6: Vec<(Ipv6Addr, u8)>,
    /// Routes to add (for the primary: all but the default route in [`Plan::config`]).
    pub routes: Vec<Route>,
}

/// What Berth applies of a configuration: every device, in the order it must be set up
/// (bonds with their members, then VLANs, whose parent may be a bond, then interfaces), and
/// the primary device's IPv4 configuration (DHCPv4, or its first `static4` address and IPv4
/// default route) as the [`super::NetConfig`] that `bring_up` applies and keeps, with the
/// default route and DNS. What it leaves out is listed in `not_applied`, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub config: super::NetConfig,
    pub devices: Vec<Setup>,
    pub not_applied: Vec<String>,
}

fn v4s(list: &[(IpAddr, u8)]) -> Vec<(Ipv4Addr, u8)> {
    list.iter().filter_map(|(a, p)| if let IpAddr::V4(a) = a { Some((*a, *p)) } else { None }).collect()
}

fn v6s(list: &[(IpAddr, u8)]) -> Vec<(Ipv6Addr, u8)> {
    list.iter().filter_map(|(a, p)| if let IpAddr::V6(a) = a { Some((*a, *p)) } else { None }).collect()
}

pub fn plan(n: &NetToml, name_of: impl Fn(&[u8; 6]) -> Option<String>) -> Result<Plan, String> {
    let p = n.primary().ok_or("net.toml configures no device")?;
    let mut not_applied = vec![];
    let mut devices = vec![];
    let mut config = None;
    for d in n.devices.iter() {
        let name = match &d.id {
            DeviceId::Name(n) => n.clone(),
            DeviceId::Mac(m) => match name_of(m) {
                Some(n) => n,
                None if d.primary => return err(format!("no interface has the MAC address {}", d.id)),
                None => {
                    not_applied.push(format!("{} (no interface has this MAC address)", d.id));
                    continue;
                }
            },
        };
        let mut s = Setup {
            name: name.clone(),
            kind: d.kind.clone(),
            primary: d.primary,
            dhcp4: d.dhcp4.is_some_and(|d| d.enabled),
            dhcp6: d.dhcp6.filter(|d| d.enabled),
            static4: v4s(&d.static4),
            static6: v6s(&d.static6),
            routes: d.routes.clone(),
        };
        if let Some(metric) = d.dhcp4.and_then(|d| d.route_metric) {
            not_applied.push(format!("{}: dhcp4 route-metric {metric}", d.id));
        }
        if d.primary {
            config = Some(if s.dhcp4 {
                s.dhcp4 = false;
                if !s.static4.is_empty() {
                    not_applied.push(format!("{}: static4 beside dhcp4 (the lease's address is kept)", d.id));
                    s.static4.clear();
                }
                super::NetConfig::Dhcp { interface: Some(name) }
            } else if let Some((address, prefix_len)) = s.static4.first().copied() {
                s.static4.remove(0);
                let default = s.routes.iter().position(|r| {
                    r.to == RouteTo::Default && matches!(r.via, Some(IpAddr::V4(_))) && r.from.is_none()
                });
                let gateway = default.map(|i| s.routes.remove(i)).and_then(|r| match r.via {
                    Some(IpAddr::V4(gw)) => Some(gw),
                    _ => None,
                });
                super::NetConfig::Static { interface: Some(name), address, prefix_len, gateway, dns: vec![] }
            } else {
                return err(format!(
                    "the primary device {} has neither dhcp4 nor static4, which Berth needs today",
                    p.id
                ));
            });
        }
        devices.push(s);
    }
    let rank = |s: &Setup| match s.kind {
        Kind::Bond { .. } => 0,
        Kind::Vlan { .. } => 1,
        Kind::Interface => 2,
    };
    devices.sort_by_key(rank);
    let config = config.ok_or("net.toml has no primary device")?;
    Ok(Plan { config, devices, not_applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_is_planned_bonds_then_vlans_then_interfaces() {
        use super::super::NetConfig;
        let n = parse(FULL).unwrap();
        let p = plan(&n, |m| (m[5] == 0x57).then(|| "eth1".to_string())).unwrap();
        // bond0 is primary, by DHCPv4: bring_up does that part.
        assert_eq!(p.config, NetConfig::Dhcp { interface: Some("bond0".into()) });
        let names: Vec<&str> = p.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bond0", "vlan42", "eth0", "eth1"]);
        let bond = &p.devices[0];
        assert!(bond.primary && !bond.dhcp4, "{bond:?}");
        assert_eq!(p.devices[1].static6, vec![("fd00:42::5".parse().unwrap(), 64)]);
        let eth0 = &p.devices[2];
        assert!(eth0.dhcp4 && !eth0.primary);
        assert_eq!(eth0.dhcp6, Some(Dhcp { enabled: true, optional: true, route_metric: None }));
        let eth1 = &p.devices[3];
        assert_eq!(eth1.static4, vec![("192.168.50.10".parse().unwrap(), 24)]);
        assert_eq!(eth1.routes.len(), 1, "a non-primary device keeps its routes");
        assert_eq!(p.not_applied, Vec::<String>::new());

        // A static primary by MAC: its first address and IPv4 default route go to bring_up,
        // the rest is added beside them.
        let text = "version = 3\n[\"52:54:00:12:34:57\"]\nprimary = true\n\
                    static4 = { addresses = [\"192.168.50.10/24\", \"192.168.51.10/24\"] }\n\
                    static6 = { addresses = [\"fd00::10/64\"] }\n\
                    [[\"52:54:00:12:34:57\".route]]\nto = \"10.9.0.0/16\"\nvia = \"192.168.50.254\"\n\
                    [[\"52:54:00:12:34:57\".route]]\nto = \"default\"\nvia = \"192.168.50.1\"\n\
                    [[\"52:54:00:12:34:57\".route]]\nto = \"default\"\nvia = \"fd00::1\"\n\
                    [eth1]\ndhcp4 = { enabled = true, route-metric = 50 }\n\
                    [\"52:54:00:99:99:99\"]\ndhcp4 = true\n";
        let n = parse(text).unwrap();
        let p = plan(&n, |m| (m[5] == 0x57).then(|| "eth0".to_string())).unwrap();
        assert_eq!(
            p.config,
            NetConfig::Static {
                interface: Some("eth0".into()),
                address: "192.168.50.10".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("192.168.50.1".parse().unwrap()),
                dns: vec![],
            }
        );
        let eth0 = &p.devices[0];
        assert_eq!(eth0.static4, vec![("192.168.51.10".parse().unwrap(), 24)]);
        assert_eq!(eth0.static6.len(), 1);
        let vias: Vec<String> = eth0.routes.iter().map(|r| format!("{:?}", r.via.unwrap())).collect();
        assert_eq!(vias, ["192.168.50.254", "fd00::1"]);
        assert!(p.devices[1].dhcp4);
        assert_eq!(
            p.not_applied,
            ["eth1: dhcp4 route-metric 50", "52:54:00:99:99:99 (no interface has this MAC address)"]
        );
        // The primary's MAC must be found.
        assert!(plan(&n, |_| None).unwrap_err().contains("no interface has the MAC address"));

        let n = from_cmdline("netdog.default-interface=eth0:dhcp4,dhcp6?").unwrap().unwrap();
        let p = plan(&n, |_| None).unwrap();
        assert_eq!(p.config, NetConfig::Dhcp { interface: Some("eth0".into()) });
        assert_eq!(p.devices[0].dhcp6, Some(Dhcp { enabled: true, optional: true, route_metric: None }));
        // The primary needs IPv4 today.
        let n = parse("version = 2\n[eth0]\nstatic6 = { addresses = [\"fd00::10/64\"] }\n").unwrap();
        assert!(plan(&n, |_| None).unwrap_err().contains("neither dhcp4 nor static4"));
    }

    const FULL: &str = r#"
version = 3

[eth0]
dhcp4 = true
dhcp6 = { enabled = true, optional = true }

["52:54:00:12:34:57".static4]
addresses = ["192.168.50.10/24"]

[["52:54:00:12:34:57".route]]
to = "default"
via = "192.168.50.1"
route-metric = 100

[bond0]
kind = "bond"
mode = "active-backup"
interfaces = ["eth2", "eth3"]
dhcp4 = true
primary = true

[bond0.monitoring]
miimon-frequency-ms = 100
miimon-updelay-ms = 200
miimon-downdelay-ms = 200

[vlan42]
kind = "vlan"
device = "eth0"
id = 42
static6 = { addresses = ["fd00:42::5/64"] }
"#;

    #[test]
    fn a_full_v3_file_parses_in_file_order() {
        let n = parse(FULL).unwrap();
        assert_eq!(n.version, 3);
        let ids: Vec<String> = n.devices.iter().map(|d| d.id.to_string()).collect();
        assert_eq!(ids, ["eth0", "52:54:00:12:34:57", "bond0", "vlan42"]);
        assert_eq!(n.primary().unwrap().id, DeviceId::Name("bond0".into()));
        let eth0 = &n.devices[0];
        assert_eq!(eth0.dhcp6, Some(Dhcp { enabled: true, optional: true, route_metric: None }));
        let mac = &n.devices[1];
        assert_eq!(mac.static4, vec![("192.168.50.10".parse().unwrap(), 24)]);
        assert_eq!(mac.routes[0].via, Some("192.168.50.1".parse().unwrap()));
        assert!(
            matches!(&n.devices[2].kind, Kind::Bond { interfaces, monitoring: Some(Monitoring::Mii { frequency_ms: 100, .. }), .. } if interfaces == &["eth2", "eth3"])
        );
        assert_eq!(n.devices[3].kind, Kind::Vlan { device: "eth0".into(), id: 42 });
    }

    #[test]
    fn the_first_device_is_primary_by_default() {
        let n = parse("version = 2\n[eth1]\ndhcp4 = true\n[eth0]\ndhcp4 = true\n").unwrap();
        assert_eq!(n.primary().unwrap().id, DeviceId::Name("eth1".into()));
    }

    #[test]
    fn netdogs_rules_are_enforced() {
        let bad = [
            ("version = 4\n[eth0]\ndhcp4 = true\n", "version"),
            ("[eth0]\ndhcp4 = true\n", "no version"),
            ("version = 1\n[eth0]\nstatic4 = { addresses = [\"10.0.0.1/24\"] }\n", "unknown key 'static4'"),
            ("version = 2\n[eth0]\ndhcp4 = true\nbogus = 1\n", "unknown key 'bogus'"),
            ("version = 2\n[eth0]\nprimary = true\n", "needs dhcp4"),
            ("version = 2\n[\"52:54:00:12:34:56\"]\ndhcp4 = true\n", "version 3"),
            ("version = 3\n[eth0]\ndhcp4 = true\nprimary = true\n[eth1]\ndhcp4 = true\nprimary = true\n", "more than one primary"),
            ("version = 2\n[eth0]\nstatic4 = { addresses = [\"fd00::1/64\"] }\n", "not an IPv4"),
            ("version = 2\n[eth0]\ndhcp4 = true\n[[eth0.route]]\nto = \"default\"\nvia = \"10.0.0.1\"\n", "routes need static"),
            ("version = 3\n[bond0]\nkind = \"bond\"\nmode = \"balance-rr\"\ninterfaces = [\"eth0\"]\ndhcp4 = true\n", "active-backup"),
            ("version = 3\n[bond0]\nkind = \"bond\"\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\ndhcp4 = true\n[eth0]\ndhcp4 = true\n", "configured on its own"),
            ("version = 3\n[bond0]\nkind = \"bond\"\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\nmin-links = 2\ndhcp4 = true\n", "min-links"),
            ("version = 3\n[bond0]\nkind = \"bond\"\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\ndhcp4 = true\n[bond0.monitoring]\nmiimon-frequency-ms = 100\n", "all three"),
            ("version = 3\n[v1]\nkind = \"vlan\"\ndevice = \"eth0\"\nid = 4096\ndhcp4 = true\n", "0 to 4095"),
            ("version = 3\n[v1]\nkind = \"vlan\"\ndevice = \"52:54:00:12:34:56\"\nid = 5\ndhcp4 = true\n", "not a MAC"),
            ("version = 3\n[\"vlan.5\"]\nkind = \"vlan\"\ndevice = \"eth0\"\nid = 5\ndhcp4 = true\n", "virtual device's name"),
            ("version = 2\n[eth0]\ndhcp4 = { optional = true }\n", "enabled: required"),
        ];
        for (text, want) in bad {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e} (want {want:?})");
        }
    }

    #[test]
    fn the_kernel_command_line_fallback() {
        let n =
            from_cmdline("console=ttyS0 netdog.default-interface=eth0:dhcp4,dhcp6? quiet").unwrap().unwrap();
        let d = &n.devices[0];
        assert_eq!(d.id, DeviceId::Name("eth0".into()));
        assert_eq!(d.dhcp4, Some(Dhcp { enabled: true, optional: false, route_metric: None }));
        assert_eq!(d.dhcp6, Some(Dhcp { enabled: true, optional: true, route_metric: None }));
        assert!(d.primary);
        assert_eq!(from_cmdline("console=ttyS0").unwrap(), None);
        for bad in [
            "netdog.default-interface=eth0:dhcp4 netdog.default-interface=eth1:dhcp4",
            "netdog.default-interface=eth0",
            "netdog.default-interface=eth0:dhcp5",
            "netdog.default-interface=eth0:dhcp4,dhcp4?",
        ] {
            assert!(from_cmdline(bad).is_err(), "{bad}");
        }
    }
}
