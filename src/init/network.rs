//! Stage 2's networking: loopback at once (services bind to 127.0.0.1), then one interface
//! (`settings.network.interface`, default the first Ethernet one) by DHCPv4 or with the static
//! address in `settings.network.static-address`, in a thread of its own, so a missing or slow
//! DHCP server never holds up the boot. DNS servers go to /etc/resolv.conf, rewritten on
//! lease renewals. Network settings take effect at the next boot. The SNTP client starts here
//! too, in its own thread, reading `settings.ntp.time-servers` from the rendered
//! /etc/ntp.conf (see `crate::time`).

use std::path::Path;
use std::sync::Arc;

use log::{error, info};

use super::Ctx;
use crate::net::{self, NetConfig};

const RESOLV_CONF: &str = "/etc/resolv.conf";

pub fn loopback(_: &mut Ctx) -> Result<(), String> {
    net::loopback().map_err(|e| e.to_string())
}

fn write_resolv_conf(up: Option<&net::Configured>) {
    let text = up.map(net::resolv_conf).unwrap_or_default();
    if let Err(e) = crate::settings::store::write_atomic(RESOLV_CONF.as_ref(), text.as_bytes()) {
        error!("{RESOLV_CONF}: {e}");
    }
}

/// The interface configuration from `settings.network` (validated when it was stored).
fn config(ctx: &Ctx) -> NetConfig {
    let n = ctx.store.as_ref().map(|s| s.settings()).and_then(|s| s.network).unwrap_or_default();
    let interface = n.interface.clone();
    match n.static_address.as_deref().and_then(crate::settings::model::parse_cidr) {
        Some((address, prefix_len)) => NetConfig::Static {
            interface,
            address,
            prefix_len,
            gateway: n.gateway.and_then(|g| g.parse().ok()),
            dns: n.name_servers.unwrap_or_default().iter().filter_map(|d| d.parse().ok()).collect(),
        },
        None => NetConfig::Dhcp { interface },
    }
}

pub fn start(ctx: &mut Ctx) -> Result<(), String> {
    let cfg = config(ctx);
    std::thread::Builder::new()
        .name("network".into())
        .stack_size(256 * 1024)
        .spawn(move || match net::bring_up(&cfg) {
            Ok(up) => {
                write_resolv_conf(Some(&up));
                let (a, len) = up.address();
                let gw = up.gateway().map_or("none".to_string(), |g| g.to_string());
                info!("network up: {} {a}/{len} gateway {gw}", up.link().name);
                if let Err(e) = net::spawn_renewal(&up, write_resolv_conf) {
                    error!("network: cannot start lease renewal: {e}");
                }
            }
            Err(e) => error!("network: {e}"),
        })
        .map_err(|e| format!("starting the network thread: {e}"))?;
    let build_time = crate::update::build_time(Path::new(crate::update::RELEASE));
    let servers = crate::time::conf_source(Path::new("/etc/ntp.conf"));
    crate::time::spawn(servers, Arc::new(crate::time::SystemClock), build_time)
        .map_err(|e| format!("starting the time thread: {e}"))
}
