//! A real DHCP exchange: dnsmasq serves 10.123.0.0/24 in one network namespace, and this test
//! binary, re-executed with `ip netns exec` in another, runs [`bring_up`] against it over a
//! veth pair; then it applies a static address over the lease. Both results are read back
//! through netlink (in the child) and `ip` (in the parent).
//!
//! Needs root, `ip` and `dnsmasq` (Debian: dnsmasq-base), and network namespaces. Where it
//! cannot run it fails under `scripts/test` and is skipped loudly elsewhere (see
//! [`crate::testing`]). The namespaces, dnsmasq and the scratch directory go away at the end
//! whatever happens (see [`Lab`], shared with the DHCPv6 test).

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::dhcp::{Answer, Client, Timing, UdpTransport};
use super::netlink::Rtnl;
use super::netns_lab::{self, find_program, report_field, run, Lab};
use super::{bring_up, resolv_conf, Configured, NetConfig};
use crate::testing;

const CHILD_ENV: &str = "BERTH_NETNS_CHILD";
const CHILD_TEST: &str = "net::netns_test::client_in_namespace";
const TEST: &str = "net::netns_test::dhcp_and_static_in_network_namespaces";
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 1);
const STATIC_IP: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 200);
const DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 123, 0, 53), Ipv4Addr::new(10, 123, 0, 54)];

/// Why the tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if let Some(why) = netns_lab::missing() {
        return Some(why);
    }
    if find_program("dnsmasq").is_none() {
        return Some("dnsmasq is not installed (Debian package dnsmasq-base)".into());
    }
    None
}

/// dnsmasq in the server's namespace: 10.123.0.50-99 on veth0, and `extra` arguments
/// (interfaces and ranges beyond veth0's).
fn start_dnsmasq(lab: &mut Lab, extra: &[&str]) -> Result<(), String> {
    let dnsmasq = find_program("dnsmasq").ok_or("dnsmasq vanished")?;
    let args = [
        "--port=0",
        "--dhcp-authoritative",
        "--dhcp-range=10.123.0.50,10.123.0.99,255.255.255.0,2m",
        "--dhcp-option=option:router,10.123.0.1",
        "--dhcp-option=option:dns-server,10.123.0.53,10.123.0.54",
        "--dhcp-option=option:domain-name,berth.test",
        "--log-dhcp",
    ];
    lab.start_dnsmasq(&dnsmasq, &[&args, extra].concat(), "DHCP, IP range")
}

#[test]
fn dhcp_and_static_in_network_namespaces() {
    if let Some(why) = missing() {
        return testing::cannot_run(TEST, &why);
    }
    let started = Instant::now();
    let mut lab = Lab::new("berth-dhcps", "berth-dhcpc", "berth-netns", CHILD_ENV);
    if !lab.build_or_skip(TEST, &format!("{SERVER_IP}/24"), &[]) {
        return;
    }
    start_dnsmasq(&mut lab, &[]).unwrap_or_else(|e| panic!("{e}"));
    let output = lab
        .run_child(CHILD_TEST, CHILD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n--- dnsmasq log ---\n{}", lab.log("dnsmasq.log")));

    // The child reported the lease it got and the MAC it used; dnsmasq must agree.
    let (leased, mac) = (report_field(&output, "lease"), report_field(&output, "mac"));
    let leases = fs::read_to_string(lab.dir.join("leases")).unwrap_or_default();
    assert!(
        leases.lines().any(|l| l.contains(&leased) && l.contains(&mac)),
        "dnsmasq has no lease of {leased} to {mac}: {leases:?}"
    );
    assert!(
        lab.log("dnsmasq.log").contains(&format!("DHCPACK(veth0) {leased}")),
        "{}",
        lab.log("dnsmasq.log")
    );

    // What the child left configured (the static address, last), seen by iproute2.
    let addrs = run(&["-n", &lab.client_ns, "-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addrs.contains(&format!("inet {STATIC_IP}/24")), "{addrs}");
    assert!(!addrs.contains(&format!("inet {leased}/")), "the DHCP address was not removed: {addrs}");
    let routes = run(&["-n", &lab.client_ns, "-4", "route", "show", "default"]).unwrap();
    assert!(routes.contains(&format!("default via {SERVER_IP} dev eth0")), "{routes}");
    let lo = run(&["-n", &lab.client_ns, "-4", "-o", "addr", "show", "dev", "lo"]).unwrap();
    assert!(lo.contains("inet 127.0.0.1/8"), "{lo}");
    eprintln!("--- child ---\n{output}--- dnsmasq ---\n{}", lab.log("dnsmasq.log"));
    eprintln!("namespace test took {:?}", started.elapsed());
}

/// Runs only as the child of the test above, inside the client namespace.
#[test]
#[ignore = "the child half of dhcp_and_static_in_network_namespaces"]
fn client_in_namespace() {
    if std::env::var(CHILD_ENV).is_err() {
        return testing::cannot_run(CHILD_TEST, &format!("it only runs as the child of {TEST}"));
    }
    crate::klog::init(false);
    // 1. DHCP.
    let up = bring_up(&NetConfig::Dhcp { interface: None }).unwrap_or_else(|e| panic!("{e}"));
    let Configured::Dhcp { link, lease } = &up else { panic!("not a DHCP result: {up:?}") };
    assert_eq!(link.name, "eth0");
    let host = lease.address.octets()[3];
    assert_eq!(&lease.address.octets()[..3], &[10, 123, 0], "{lease:?}");
    assert!((50..=99).contains(&host), "{lease:?}");
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(lease.router, Some(SERVER_IP));
    assert_eq!(lease.server, SERVER_IP);
    assert_eq!(lease.dns, DNS.to_vec());
    assert_eq!(lease.domain.as_deref(), Some("berth.test"));
    assert_eq!(lease.lease_secs, 120);
    assert!(lease.t1 < lease.t2 && lease.t2 < lease.lease_secs, "{lease:?}");

    // Read back through netlink: the address, the default route, loopback.
    let mut nl = Rtnl::open().unwrap();
    let links = nl.links().unwrap();
    let lo = links.iter().find(|l| l.is_loopback()).unwrap();
    assert!(lo.is_up());
    let lo_addrs = nl.addrs(Some(lo.index)).unwrap();
    assert!(lo_addrs.iter().any(|a| a.address == Ipv4Addr::LOCALHOST && a.prefix_len == 8), "{lo_addrs:?}");
    let eth = links.iter().find(|l| l.index == link.index).unwrap();
    assert!(eth.is_up());
    let addrs: Vec<_> =
        nl.addrs(Some(link.index)).unwrap().iter().map(|a| (a.address, a.prefix_len)).collect();
    assert_eq!(addrs, vec![(lease.address, 24)]);
    let default = nl.routes().unwrap().into_iter().find(|r| r.is_default()).expect("a default route");
    assert_eq!((default.gateway, default.oif), (Some(SERVER_IP), Some(link.index)));

    let conf = resolv_conf(&up);
    assert!(conf.contains("search berth.test\nnameserver 10.123.0.53\nnameserver 10.123.0.54\n"), "{conf}");

    // 2. Renewal (unicast to the server, now that we have an address) and rebinding
    // (broadcast): both must be acknowledged with the same address.
    let mac = link.mac.unwrap();
    for rebinding in [false, true] {
        let transport = UdpTransport::open("eth0").unwrap();
        let answer = Client::new(transport, "eth0", mac, Timing::default())
            .renew(lease, rebinding, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        match answer {
            Some(Answer::Ack(renewed)) => {
                assert!(!renewed.differs_in_config(lease), "rebinding={rebinding}: {renewed:?}")
            }
            other => panic!("rebinding={rebinding}: {other:?}"),
        }
    }

    // 3. A static address replaces the lease's.
    let static_up = bring_up(&NetConfig::Static {
        interface: Some("eth0".into()),
        address: STATIC_IP,
        prefix_len: 24,
        gateway: Some(SERVER_IP),
        dns: vec![DNS[0]],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(static_up.address(), (STATIC_IP, 24));
    let addrs: Vec<_> =
        nl.addrs(Some(link.index)).unwrap().iter().map(|a| (a.address, a.prefix_len)).collect();
    assert_eq!(addrs, vec![(STATIC_IP, 24)]);
    let default = nl.routes().unwrap().into_iter().find(|r| r.is_default()).expect("a default route");
    assert_eq!(default.gateway, Some(SERVER_IP));

    // 4. Errors name the operation and the interface; an address already gone is fine to
    // delete when that is allowed.
    let err = nl.del_addr(link, Ipv4Addr::new(10, 123, 0, 7), 24).unwrap_err().to_string();
    assert!(err.contains("delete address 10.123.0.7/24 on eth0"), "{err}");
    eprintln!("the kernel's refusal reads: {err}");
    nl.del_addr_if_present(link, Ipv4Addr::new(10, 123, 0, 7), 24).unwrap_or_else(|e| panic!("{e}"));
    // Secondaries go with their primary: flushing must not trip over them.
    nl.add_addr(link, Ipv4Addr::new(10, 123, 0, 201), 24).unwrap();
    nl.flush(link).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(nl.addrs(Some(link.index)).unwrap(), vec![]);
    nl.add_addr(link, STATIC_IP, 24).unwrap();
    nl.default_route(link, SERVER_IP, super::netlink::RouteProto::Static).unwrap();

    println!("CHILD-OK lease={} mac={}", lease.address, link.mac_string());
}

const DEVICES_TEST: &str = "net::netns_test::net_toml_devices_in_network_namespaces";
const DEVICES_CHILD: &str = "net::netns_test::devices_in_namespace";

/// net.toml's devices as the child applies them: eth0 primary by DHCP (its router is the
/// default route), eth1 static with two IPv4 addresses, an IPv6 one and routes of both
/// families (a gateway, a metric, a source, one on the link), eth2 by DHCP beside it (an
/// address, not its router).
const DEVICES_TOML: &str = r#"version = 3
[eth0]
primary = true
dhcp4 = true

[eth1]
static4 = { addresses = ["10.124.0.2/24", "10.124.1.2/24"] }
static6 = { addresses = ["fd00:124::2/64"] }

[[eth1.route]]
to = "10.200.0.0/16"
via = "10.124.0.1"
from = "10.124.0.2"
route-metric = 50

[[eth1.route]]
to = "10.201.0.0/16"

[[eth1.route]]
to = "fd00:200::/48"
via = "fd00:124::1"
route-metric = 70

[eth2]
dhcp4 = true
"#;

fn ip_json(args: &[&str]) -> serde_json::Value {
    let text = run(args).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip {}: {e}: {text}", args.join(" ")))
}

/// The `addr_info` of `dev` in `ns` as "ADDR/PREFIX" strings, of one family.
fn addrs_of(ns: &str, family: &str, dev: &str) -> Vec<String> {
    let v = ip_json(&["-n", ns, "-j", family, "addr", "show", "dev", dev, "scope", "global"]);
    v[0]["addr_info"]
        .as_array()
        // iproute2 lists the addresses its filter left out as empty objects.
        .map(|a| {
            a.iter().filter_map(|i| Some(format!("{}/{}", i["local"].as_str()?, i["prefixlen"]))).collect()
        })
        .unwrap_or_default()
}

#[test]
fn net_toml_devices_in_network_namespaces() {
    if let Some(why) = missing() {
        return testing::cannot_run(DEVICES_TEST, &why);
    }
    let mut lab = Lab::new("berth-devs", "berth-devc", "berth-netns-devs", CHILD_ENV);
    if !lab.build_or_skip(DEVICES_TEST, &format!("{SERVER_IP}/24"), &[]) {
        return;
    }
    let (s, c) = (lab.server_ns.clone(), lab.client_ns.clone());
    let setup = || -> Result<(), String> {
        for (i, four, six) in [(1, "10.124.0.1/24", Some("fd00:124::1/64")), (2, "10.126.0.1/24", None)] {
            let (veth, eth) = (format!("veth{i}"), format!("eth{i}"));
            run(&["-n", &s, "link", "add", &veth, "type", "veth", "peer", "name", &eth, "netns", &c])?;
            run(&["-n", &s, "addr", "add", four, "dev", &veth])?;
            if let Some(six) = six {
                run(&["-n", &s, "addr", "add", six, "dev", &veth, "nodad"])?;
            }
            run(&["-n", &s, "link", "set", &veth, "up"])?;
        }
        // A link for the child to delete.
        run(&["-n", &c, "link", "add", "junk0", "type", "veth", "peer", "name", "junk1"])?;
        Ok(())
    };
    setup().unwrap_or_else(|e| panic!("{e}"));
    let eth2_range = [
        "--interface=veth2",
        "--dhcp-range=set:two,10.126.0.50,10.126.0.99,255.255.255.0,2m",
        "--dhcp-option=tag:two,option:router,10.126.0.1",
    ];
    start_dnsmasq(&mut lab, &eth2_range).unwrap_or_else(|e| panic!("{e}"));
    let output = lab
        .run_child(DEVICES_CHILD, CHILD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n--- dnsmasq log ---\n{}", lab.log("dnsmasq.log")));

    // What the child left, seen by iproute2.
    let eth0 = addrs_of(&c, "-4", "eth0");
    assert!(eth0.len() == 1 && eth0[0].starts_with("10.123.0.") && eth0[0].ends_with("/24"), "{eth0:?}");
    assert_eq!(addrs_of(&c, "-4", "eth1"), ["10.124.0.2/24", "10.124.1.2/24"]);
    assert_eq!(addrs_of(&c, "-6", "eth1"), ["fd00:124::2/64"]);
    let eth2 = addrs_of(&c, "-4", "eth2");
    assert!(eth2.len() == 1 && eth2[0].starts_with("10.126.0.") && eth2[0].ends_with("/24"), "{eth2:?}");
    // Exactly one default route: the primary's.
    let defaults = ip_json(&["-n", &c, "-j", "-4", "route", "show", "default"]);
    let defaults: Vec<(String, String)> = defaults
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["gateway"].as_str().unwrap_or("-").to_string(), r["dev"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(defaults, [("10.123.0.1".to_string(), "eth0".to_string())]);
    let r = ip_json(&["-n", &c, "-j", "-4", "route", "show", "10.200.0.0/16"]);
    let r = &r[0];
    assert_eq!(
        (r["gateway"].as_str(), r["dev"].as_str(), r["metric"].as_u64(), r["prefsrc"].as_str()),
        (Some("10.124.0.1"), Some("eth1"), Some(50), Some("10.124.0.2")),
        "{r}"
    );
    assert_eq!(r["protocol"].as_str(), Some("static"), "{r}");
    let r = ip_json(&["-n", &c, "-j", "-4", "route", "show", "10.201.0.0/16"]);
    assert_eq!((r[0]["dev"].as_str(), r[0]["scope"].as_str()), (Some("eth1"), Some("link")), "{r}");
    let r = ip_json(&["-n", &c, "-j", "-6", "route", "show", "fd00:200::/48"]);
    assert_eq!(
        (r[0]["gateway"].as_str(), r[0]["dev"].as_str(), r[0]["metric"].as_u64()),
        (Some("fd00:124::1"), Some("eth1"), Some(70)),
        "{r}"
    );
    let links = run(&["-n", &c, "-o", "link", "show"]).unwrap();
    assert!(!links.contains("junk0"), "the deleted link is still there: {links}");
    eprintln!("--- child ---\n{output}--- dnsmasq ---\n{}", lab.log("dnsmasq.log"));
}

/// Runs only as the child of the test above, inside the client namespace: net.toml's plan
/// applied as the network task applies it.
#[test]
#[ignore = "the child half of net_toml_devices_in_network_namespaces"]
fn devices_in_namespace() {
    if std::env::var(CHILD_ENV).is_err() {
        return testing::cannot_run(DEVICES_CHILD, &format!("it only runs as the child of {DEVICES_TEST}"));
    }
    crate::klog::init(false);
    let plan = super::nettoml::plan(&super::nettoml::parse(DEVICES_TOML).unwrap(), |_| None).unwrap();
    assert_eq!(plan.not_applied, Vec::<String>::new());
    let failed = super::setup_devices(&plan.devices).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(failed, Vec::<String>::new());
    super::spawn_secondary_dhcp(&plan.devices);
    let up = bring_up(&plan.config).unwrap_or_else(|e| panic!("{e}"));
    super::finish_primary(&plan.devices).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.link().name, "eth0");
    assert_eq!(up.gateway(), Some(SERVER_IP));

    // eth2's lease comes in its own thread.
    let mut nl = Rtnl::open().unwrap();
    let links = nl.links().unwrap();
    let eth2 = links.iter().find(|l| l.name == "eth2").unwrap();
    let start = Instant::now();
    while nl.addrs(Some(eth2.index)).unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(15), "eth2 got no lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A link is deleted; deleting it again is refused, with the operation and the link named.
    let junk = links.iter().find(|l| l.name == "junk0").unwrap();
    nl.del_link(junk).unwrap_or_else(|e| panic!("{e}"));
    let err = nl.del_link(junk).unwrap_err().to_string();
    assert!(err.contains("delete the link on junk0"), "{err}");
    println!("CHILD-OK");
}
