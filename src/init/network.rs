//! Stage 2's networking: loopback at once (services bind to 127.0.0.1), then net.toml's devices
//! when there is one, and the primary interface (net.toml's, `netdog.default-interface`, or
//! `settings.network.interface`, default the first Ethernet one) by DHCPv4 or with its static
//! address, in a thread of its own, so a missing or slow DHCP server never holds up the boot.
//! DNS servers go to /etc/resolv.conf, rewritten on lease renewals. Network settings take
//! effect at the next boot. The SNTP client starts here too, in its own thread, reading
//! `settings.ntp.time-servers` from the rendered /etc/ntp.conf (see `crate::time`).
//!
//! When `net.toml` or `netdog.default-interface` asks for `dhcp6` on the primary interface,
//! the DHCPv6 client (`net::dhcp6`) runs as a task of its own beside DHCPv4; its DNS servers
//! and search list join resolv.conf. `dhcp6?` (optional) is not waited for; a required one
//! holds back the network's readiness (below) until its first address or failure.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{error, info};

use super::Ctx;
use crate::boot::BootError;
use crate::net::{self, nettoml, NetConfig};

const RESOLV_CONF: &str = "/etc/resolv.conf";

pub fn loopback(_: &mut Ctx) -> Result<(), BootError> {
    net::loopback().map_err(BootError::Network)
}

/// The latest configuration of each family, that resolv.conf is written from: IPv4's, and
/// the interface and lease of DHCPv6.
type Latest = (Option<net::Configured>, Option<(String, net::dhcp6::Lease)>);
static LATEST: Mutex<Latest> = Mutex::new((None, None));

fn write_resolv_conf(up: Option<&net::Configured>) {
    let mut latest = LATEST.lock().unwrap_or_else(|p| p.into_inner());
    latest.0 = up.cloned();
    render_resolv_conf(&latest);
}

fn write_resolv_conf6(interface: &str, lease: Option<&net::dhcp6::Lease>) {
    let mut latest = LATEST.lock().unwrap_or_else(|p| p.into_inner());
    latest.1 = lease.map(|l| (interface.to_string(), l.clone()));
    render_resolv_conf(&latest);
}

/// The network's resolv.conf is kept in `render::NETWORK_RESOLV_CONF`; /etc/resolv.conf is it
/// with `settings.dns` on top (see `settings::render::resolv_conf`).
fn render_resolv_conf(latest: &Latest) {
    use crate::settings::render;
    let mut base = latest.0.as_ref().map(net::resolv_conf).unwrap_or_default();
    if let Some((interface, lease)) = &latest.1 {
        base = net::dhcp6::resolv_conf(&base, interface, lease);
    }
    let path = Path::new(render::NETWORK_RESOLV_CONF);
    let _ = path.parent().map(std::fs::create_dir_all);
    if let Err(e) = crate::settings::store::write_atomic(path, base.as_bytes()) {
        error!("{}: {e}", path.display());
    }
    let text = render::resolv_conf_for_network(&base);
    if let Err(e) = crate::settings::store::write_atomic(RESOLV_CONF.as_ref(), text.as_bytes()) {
        error!("{RESOLV_CONF}: {e}");
    }
}

/// Where the first boot keeps the BOOT partition's `net.toml` (PRIVATE).
pub const NET_TOML: &str = "/var/lib/berth/net.toml";

/// The interface whose MAC address is `mac`, from sysfs.
fn name_of(mac: &[u8; 6]) -> Option<String> {
    let want = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    std::fs::read_dir("/sys/class/net").ok()?.flatten().find_map(|e| {
        let a = std::fs::read_to_string(e.path().join("address")).ok()?;
        (a.trim().eq_ignore_ascii_case(&want)).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// The plan from `net.toml` (kept from the BOOT partition at first boot), else from the
/// kernel command line's `netdog.default-interface`; None without either, or when it cannot
/// be used (the error is reported and `settings.network` applies).
fn from_net_toml() -> Option<nettoml::Plan> {
    let (what, parsed) = match std::fs::read(NET_TOML) {
        Ok(bytes) => (
            "net.toml",
            String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string()).and_then(|t| nettoml::parse(&t)),
        ),
        Err(_) => {
            match nettoml::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()) {
                Ok(Some(n)) => ("netdog.default-interface", Ok(n)),
                Ok(None) => return None,
                Err(e) => ("the kernel command line", Err(e)),
            }
        }
    };
    match parsed.and_then(|n| nettoml::plan(&n, name_of)) {
        Ok(p) => {
            info!("network: configured from {what}");
            for x in &p.not_applied {
                log::warn!("network: {what}: not applied (not supported yet): {x}");
            }
            Some(p)
        }
        Err(e) => {
            crate::boot::report::notice(format!("network: {what}: {e}; settings.network applies instead"));
            None
        }
    }
}

/// The interface configuration: `net.toml` or `netdog.default-interface` when there is one
/// (the primary device's, and every device to set up), else `settings.network` (validated
/// when it was stored; no other devices).
fn config(ctx: &Ctx) -> (NetConfig, Vec<nettoml::Setup>) {
    if let Some(p) = from_net_toml() {
        return (p.config, p.devices);
    }
    let n = ctx.store.as_ref().map(|s| s.settings()).and_then(|s| s.network).unwrap_or_default();
    let interface = n.interface.clone();
    let config = match n.static_address.as_deref().and_then(crate::settings::model::parse_cidr) {
        Some((address, prefix_len)) => NetConfig::Static {
            interface,
            address,
            prefix_len,
            gateway: n.gateway.and_then(|g| g.parse().ok()),
            dns: n.name_servers.unwrap_or_default().iter().filter_map(|d| d.parse().ok()).collect(),
        },
        None => NetConfig::Dhcp { interface },
    };
    (config, vec![])
}

/// How long a boot phase that needs the network (IMDS on EC2) waits for it: DHCP's own budget
/// (15 s) and the wait for carrier (3 s), with room to spare, and well inside the watchdog's
/// timeout (the wait feeds it anyway).
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// The outcome of the network task's latest attempt to bring the interface up: the address it
/// configured, or why it failed. Phases that need the network wait on it.
#[derive(Clone, Default)]
pub struct Readiness(Arc<(Mutex<Option<Outcome>>, Condvar)>);

/// An attempt's outcome: the interface and address configured, or why not.
type Outcome = Result<String, String>;

impl Readiness {
    fn set(&self, outcome: Outcome) {
        let (state, cond) = &*self.0;
        *state.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        cond.notify_all();
    }

    /// Wait up to `limit` for the first attempt's outcome: the configured address, or why the
    /// interface is not up (the attempt failed, or it did not end in time). Feeds the watchdog
    /// while it waits.
    pub fn wait(&self, limit: Duration) -> Outcome {
        let deadline = Instant::now() + limit;
        let (state, cond) = &*self.0;
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = guard.as_ref() {
                return outcome.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the interface was not configured within {limit:?}"));
            }
            guard = cond
                .wait_timeout(guard, left.min(Duration::from_secs(1)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            crate::boot::watchdog::feed();
        }
    }
}

/// Bring the interface up and keep its lease, as a supervised task: if the thread dies (a
/// panic, a netlink socket that fails for good), it starts again and configures from scratch.
/// Each attempt's outcome goes to `ctx.network` ([`Readiness`]).
pub fn start(ctx: &mut Ctx) -> Result<(), BootError> {
    let (cfg, devices) = config(ctx);
    let joint = Joint { readiness: ctx.network.clone(), outcomes: Default::default() };
    let interface = match &cfg {
        NetConfig::Dhcp { interface } | NetConfig::Static { interface, .. } => interface.clone(),
    };
    // The primary device's dhcp6 (net.toml's, or netdog.default-interface's).
    let dhcp6 = devices.iter().find(|d| d.primary).and_then(|d| d.dhcp6).filter(|d| d.enabled);
    if let (Some(d), Some(name)) = (dhcp6, interface) {
        start_dhcp6(ctx, name, d.optional, joint.clone());
    }
    // net.toml's other devices are set up (and their DHCP clients started) by the first
    // attempt only; an attempt after a failure configures the primary device again.
    let devices_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    ctx.tasks.add("network", move || {
        let (cfg, readiness, devices, done) =
            (cfg.clone(), joint.clone(), devices.clone(), devices_done.clone());
        super::tasks::thread("network", 256 * 1024, move || {
            if !devices.is_empty() && !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
                match net::setup_devices(&devices) {
                    Ok(failed) if failed.is_empty() => {}
                    Ok(failed) => crate::boot::report::notice(format!(
                        "network: net.toml: could not set up {}",
                        failed.join(", ")
                    )),
                    Err(e) => {
                        // No netlink socket: the next attempt tries again.
                        done.store(false, std::sync::atomic::Ordering::SeqCst);
                        readiness.set(Err(e.to_string()));
                        return Err(e.to_string());
                    }
                }
                net::spawn_secondary_dhcp(&devices);
            }
            let up = match net::bring_up(&cfg) {
                Ok(up) => up,
                Err(e) => {
                    readiness.set(Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            if let Err(e) = net::finish_primary(&devices) {
                error!("{e}");
            }
            write_resolv_conf(Some(&up));
            let (a, len) = up.address();
            let gw = up.gateway().map_or("none".to_string(), |g| g.to_string());
            info!("network up: {} {a}/{len} gateway {gw}", up.link().name);
            readiness.set(Ok(format!("{} {a}/{len}", up.link().name)));
            match net::spawn_renewal(&up, write_resolv_conf) {
                // The lease is kept by the renewal loop, which never returns; if it dies, so
                // does this task, and the supervisor starts both again.
                Ok(Some(renewal)) => match renewal.join() {
                    Ok(()) => Err("the DHCP renewal loop ended".into()),
                    Err(p) => Err(format!(
                        "the DHCP renewal loop panicked: {}",
                        super::tasks::panic_text(p.as_ref())
                    )),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(format!("cannot start lease renewal: {e}")),
            }
        })
    });
    // The SNTP client, supervised the same way (a keeper started again keeps its state).
    let build_time = crate::update::build_time(Path::new(crate::update::RELEASE));
    ctx.tasks.add("time", move || {
        let servers = crate::time::conf_source(Path::new("/etc/ntp.conf"));
        super::tasks::thread("time", 256 * 1024, move || {
            crate::time::run(servers, Arc::new(crate::time::SystemClock), build_time)
        })
    });
    Ok(())
}

/// The network's readiness from IPv4's outcome and, when DHCPv6 is required, DHCPv6's first
/// one: an IPv4 failure at once; else IPv4's address, joined by DHCPv6's when it is required.
#[derive(Clone)]
struct Joint {
    readiness: Readiness,
    /// IPv4's latest outcome; DHCPv6's first, or None while optional or pending; whether it
    /// is required.
    outcomes: Arc<Mutex<Outcomes>>,
}

type Outcomes = (Option<Outcome>, Option<Outcome>, bool);

impl Joint {
    fn set(&self, v4: Outcome) {
        let mut o = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        o.0 = Some(v4);
        self.publish(&o);
    }

    fn set6(&self, v6: Outcome) {
        let mut o = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        o.1 = Some(v6);
        self.publish(&o);
    }

    fn publish(&self, o: &Outcomes) {
        match o {
            (Some(Err(e)), _, _) => self.readiness.set(Err(e.clone())),
            (Some(Ok(a)), _, false) => self.readiness.set(Ok(a.clone())),
            (Some(Ok(a)), Some(Ok(b)), true) => self.readiness.set(Ok(format!("{a}, {b}"))),
            (Some(Ok(_)), Some(Err(e)), true) => self.readiness.set(Err(e.clone())),
            _ => {}
        }
    }
}

/// The DHCPv6 client on `name`, as a supervised task of its own (`net::dhcp6::run`).
fn start_dhcp6(ctx: &mut Ctx, name: String, optional: bool, joint: Joint) {
    joint.outcomes.lock().unwrap_or_else(|p| p.into_inner()).2 = !optional;
    info!("network: DHCPv6 on {name}{}", if optional { " (optional)" } else { "" });
    ctx.tasks.add("dhcp6", move || {
        let (name, joint) = (name.clone(), joint.clone());
        super::tasks::thread("dhcp6", 256 * 1024, move || {
            let first = |outcome: Result<&net::dhcp6::Lease, String>| {
                joint.set6(outcome.map(|l| format!("{name} {}/128", l.address)))
            };
            net::dhcp6::run(&name, first, |lease| write_resolv_conf6(&name, lease))
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joint(required: bool) -> Joint {
        let j = Joint { readiness: Readiness::default(), outcomes: Default::default() };
        j.outcomes.lock().unwrap().2 = required;
        j
    }

    fn now(j: &Joint) -> Option<Outcome> {
        j.readiness.0 .0.lock().unwrap().clone()
    }

    #[test]
    fn a_required_dhcp6_holds_readiness_back_and_an_optional_one_does_not() {
        let j = joint(false);
        j.set(Ok("eth0 10.0.2.15/24".into()));
        assert_eq!(now(&j), Some(Ok("eth0 10.0.2.15/24".into())));
        j.set6(Err("dhcp6: no answer".into()));
        assert_eq!(now(&j), Some(Ok("eth0 10.0.2.15/24".into())), "optional: its failure does not count");

        let j = joint(true);
        j.set(Ok("eth0 10.0.2.15/24".into()));
        assert_eq!(now(&j), None, "waiting for DHCPv6");
        j.set6(Ok("eth0 fd12::100/128".into()));
        assert_eq!(now(&j), Some(Ok("eth0 10.0.2.15/24, eth0 fd12::100/128".into())));

        let j = joint(true);
        j.set6(Err("dhcp6: no answer".into()));
        assert_eq!(now(&j), None, "nothing before IPv4's outcome");
        j.set(Ok("eth0 10.0.2.15/24".into()));
        assert_eq!(now(&j), Some(Err("dhcp6: no answer".into())));
        j.set(Err("dhcp: no offer".into()));
        assert_eq!(now(&j), Some(Err("dhcp: no offer".into())));
    }
}
