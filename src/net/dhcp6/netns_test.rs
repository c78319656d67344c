//! A real DHCPv6 exchange, and names and HTTP over IPv6: dnsmasq serves DHCPv6 (addresses in
//! fd12:3456::/64, a 2-minute lease, DNS server and search list), router advertisements and
//! DNS (an AAAA record for `www.berth.test`) on one end of a veth pair in one network
//! namespace; a tiny HTTP server (this test binary, re-executed) listens on the server's IPv6
//! address there. In another namespace this binary, re-executed with `ip netns exec`, runs
//! [`bring_up`] on the other end, renews and rebinds, writes resolv.conf from the lease, and
//! fetches `http://www.berth.test:8080/` through Berth's HTTP client, so the name is resolved
//! over IPv6 by the C library from the resolv.conf Berth wrote. The parent checks dnsmasq's
//! side (its lease file and log) and the address through iproute2.
//!
//! Needs root, `ip`, dnsmasq (Debian: dnsmasq-base) and network namespaces. Without root (or
//! namespaces) it is skipped loudly (and fails under `scripts/test`, see [`crate::testing`]);
//! as root without dnsmasq it fails. `ip netns exec` bind-mounts `/etc/netns/NS/resolv.conf`
//! over `/etc/resolv.conf`, which is how the child's resolv.conf stays its own; the namespaces,
//! processes, that directory and the scratch directory go away at the end whatever happens.

use std::fs;
use std::net::{Ipv6Addr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::super::netns_lab::{self, find_program, report_field, run, Lab};
use super::*;
use crate::testing;

const CHILD_ENV: &str = "BERTH_NETNS6_CHILD";
const TEST: &str = "net::dhcp6::netns_test::dhcp6_dns_and_http_over_ipv6_in_network_namespaces";
const CLIENT_TEST: &str = "net::dhcp6::netns_test::client_in_namespace";
const HTTP_TEST: &str = "net::dhcp6::netns_test::http_server_in_namespace";
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER: Ipv6Addr = Ipv6Addr::new(0xfd12, 0x3456, 0, 0, 0, 0, 0, 1);
const HTTP_PORT: u16 = 8080;
const BODY: &str = "berth over IPv6\n";

/// dnsmasq in the server's namespace: DHCPv6, router advertisements and DNS on veth0.
fn start_dnsmasq(lab: &mut Lab, dnsmasq: PathBuf) -> Result<(), String> {
    let args = [
        "--port=53",
        "--enable-ra",
        "--dhcp-range=fd12:3456::100,fd12:3456::1ff,64,2m",
        "--dhcp-option=option6:dns-server,[fd12:3456::1]",
        "--dhcp-option=option6:domain-search,berth.test,example.org",
        "--host-record=www.berth.test,fd12:3456::1",
        // Answer berth.test from here only: A for an IPv6-only name is an empty answer, not
        // a refusal for want of upstream servers.
        "--local=/berth.test/",
        "--log-dhcp",
        "--log-queries",
    ];
    lab.start_dnsmasq(&dnsmasq, &args, "DHCPv6, IP range")
}

/// The HTTP server half in the server's namespace.
fn start_http(lab: &mut Lab) -> Result<(), String> {
    let server_ns = lab.server_ns.clone();
    lab.spawn_test(&server_ns, HTTP_TEST, "http.log")?;
    lab.wait_for("http.log", "SERVING", Duration::from_secs(10))
}

fn logs(lab: &Lab) -> String {
    format!("--- dnsmasq ---\n{}--- http ---\n{}", lab.log("dnsmasq.log"), lab.log("http.log"))
}

#[test]
fn dhcp6_dns_and_http_over_ipv6_in_network_namespaces() {
    if let Some(why) = netns_lab::missing() {
        return testing::cannot_run(TEST, &why);
    }
    let Some(dnsmasq) = find_program("dnsmasq") else {
        panic!("{TEST}: dnsmasq is not installed; it is the DHCPv6 server of this test (Debian package dnsmasq-base, see scripts/setup)");
    };
    let mut lab = Lab::new("berth-dhcp6s", "berth-dhcp6c", "berth-netns6", CHILD_ENV);
    // The client's own resolv.conf (see the module docs); empty until the child writes it.
    let etc = PathBuf::from("/etc/netns").join(&lab.client_ns);
    lab.remove_at_end(etc.clone());
    if !lab.build_or_skip(TEST, &format!("{SERVER}/64"), &["nodad"]) {
        return;
    }
    let (server_ns, client_ns) = (lab.server_ns.clone(), lab.client_ns.clone());
    // veth0's own link-local address only comes (and runs duplicate address detection, about
    // a second) once the client brings eth0 up, while the client solicits at once: dnsmasq's
    // first answers would come from fd12:3456::1. A link-local address without DAD is ready.
    run(&["-n", &server_ns, "addr", "add", "fe80::1/64", "dev", "veth0", "nodad"])
        .unwrap_or_else(|e| panic!("{e}"));
    // eth0 stays down: bringing it up is the client's job.
    run(&["-n", &client_ns, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
    fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("{}: {e}", etc.display()));
    fs::write(etc.join("resolv.conf"), "").unwrap_or_else(|e| panic!("{}: {e}", etc.display()));
    start_dnsmasq(&mut lab, dnsmasq).unwrap_or_else(|e| panic!("{e}"));
    start_http(&mut lab).unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let output = lab.run_child(CLIENT_TEST, CHILD_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let (address, mac) = (report_field(&output, "address"), report_field(&output, "mac"));

    // dnsmasq's side: the lease, to our DUID-LL (type 3, Ethernet, the MAC), and the replies.
    let leases = fs::read_to_string(lab.dir.join("leases")).unwrap_or_default();
    let duid = format!("00:03:00:01:{mac}");
    assert!(
        leases.lines().any(|l| l.contains(&address) && l.contains(&duid)),
        "dnsmasq has no lease of {address} to {duid}: {leases:?}\n{}",
        logs(&lab)
    );
    let log = lab.log("dnsmasq.log");
    let steps = ["DHCPSOLICIT(veth0)", "DHCPADVERTISE(veth0)", "DHCPREQUEST(veth0)", "DHCPREPLY(veth0)"];
    for step in steps.iter().chain(&["DHCPRENEW(veth0)", "DHCPREBIND(veth0)"]) {
        assert!(log.contains(step), "no {step} in dnsmasq's log:\n{log}");
    }
    assert!(log.contains("query[AAAA] www.berth.test"), "the name was not asked over IPv6 DNS:\n{log}");
    assert!(lab.log("http.log").contains("GET / HTTP/1.1"), "{}", logs(&lab));

    // What the client left configured, seen by iproute2: the address, /128, with lifetimes.
    let addrs = run(&["-n", &lab.client_ns, "-6", "addr", "show", "dev", "eth0"]).unwrap();
    // "dynamic" with nothing after it: past duplicate address detection (not "tentative").
    assert!(addrs.contains(&format!("inet6 {address}/128 scope global dynamic \n")), "{addrs}");
    let valid = addrs
        .split_whitespace()
        .skip_while(|w| *w != "valid_lft")
        .nth(1)
        .and_then(|v| v.trim_end_matches("sec").parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no finite valid_lft: {addrs}"));
    assert!((1..=120).contains(&valid), "{addrs}");
    eprintln!("--- client ---\n{output}{}", logs(&lab));
}

/// The client half, run only by the test above, inside the client namespace.
#[test]
#[ignore = "the child half of dhcp6_dns_and_http_over_ipv6_in_network_namespaces"]
fn client_in_namespace() {
    if std::env::var(CHILD_ENV).is_err() {
        return testing::cannot_run(CLIENT_TEST, &format!("it only runs as the child of {TEST}"));
    }
    crate::klog::init(false);
    let started = Instant::now();
    // 1. Solicit, Advertise, Request, Reply: the address, DNS server and search list.
    let (link, lease) = bring_up("eth0").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("acquired {lease:?} in {:?}", started.elapsed());
    let host = lease.address.segments()[7];
    assert_eq!(&lease.address.segments()[..7], &[0xfd12, 0x3456, 0, 0, 0, 0, 0], "{lease:?}");
    assert!((0x100..=0x1ff).contains(&host), "{lease:?}");
    assert_eq!(lease.valid, 120, "{lease:?}");
    assert!(lease.preferred <= lease.valid && lease.t1 > 0 && lease.t1 <= lease.t2 && lease.t2 < lease.valid);
    assert_eq!(lease.dns, vec![SERVER]);
    assert_eq!(lease.search, vec!["berth.test", "example.org"]);
    assert!((lease.server.segments()[0] & 0xffc0) == 0xfe80, "dnsmasq answers from its link-local address");
    assert_eq!(fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/accept_ra").unwrap().trim(), "2");

    let mut nl = Rtnl::open().unwrap();
    let mine: Vec<_> =
        nl.addrs6(Some(link.index)).unwrap().into_iter().filter(|a| a.address == lease.address).collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].prefix_len, 128);

    // 2. Renew (with the server id) and Rebind (without): the same address, lifetimes again.
    let (_, ll) = prepare("eth0").unwrap_or_else(|e| panic!("{e}"));
    for rebinding in [false, true] {
        let until = Instant::now() + Duration::from_secs(15);
        let got =
            client(&link, ll).unwrap().renew(&lease, rebinding, until).unwrap_or_else(|e| panic!("{e}"));
        match got {
            Renewal::Renewed(new) => {
                assert!(!new.differs_in_config(&lease), "rebinding={rebinding}: {new:?}");
                assert_eq!(new.valid, 120);
                apply(&link, &new).unwrap_or_else(|e| panic!("{e}"));
            }
            other => panic!("rebinding={rebinding}: {other:?}"),
        }
    }

    // 3. Without Rapid Commit: Solicit, Advertise, Request, Reply; the same DUID and IAID get
    // the same address.
    let transport = UdpTransport::open(ll, link.index).unwrap();
    let timing = Timing { rapid_commit: false, ..Timing::default() };
    let again =
        Client::new(transport, "eth0", link.mac.unwrap(), timing).acquire().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.address, lease.address);
    assert!(!again.differs_in_config(&lease), "{again:?}");

    // 4. resolv.conf from the lease (ours: `ip netns exec` bind-mounted it), then a name
    // through the C library's resolver over IPv6, and HTTP to it through Berth's client.
    let conf = resolv_conf("", "eth0", &lease);
    assert!(conf.contains("search berth.test example.org\nnameserver fd12:3456::1\n"), "{conf}");
    fs::write("/etc/resolv.conf", &conf).unwrap();
    // The route to the server comes from dnsmasq's router advertisement (accept_ra).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fs::read_to_string("/proc/net/ipv6_route")
        .unwrap_or_default()
        .contains("fd123456000000000000000000000000 40")
    {
        assert!(Instant::now() < deadline, "no on-link route from the router advertisement");
        std::thread::sleep(Duration::from_millis(100));
    }
    let resolved: Vec<_> =
        ("www.berth.test", HTTP_PORT).to_socket_addrs().unwrap_or_else(|e| panic!("{e}")).collect();
    assert_eq!(resolved, vec![std::net::SocketAddr::from((SERVER, HTTP_PORT))]);
    let url = url::Url::parse(&format!("http://www.berth.test:{HTTP_PORT}/")).unwrap();
    let opts = crate::http::client::Options::default();
    let mut conn = crate::http::client::Connection::open(&url, &opts).unwrap_or_else(|e| panic!("{e}"));
    let req = crate::http::client::Request {
        method: "GET",
        target: "/",
        host: &format!("www.berth.test:{HTTP_PORT}"),
        headers: &[],
        body: b"",
    };
    let (head, body) = conn.exchange(&req, 1024).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(head.status, 200);
    assert_eq!(String::from_utf8_lossy(&body), BODY);
    let routes = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    eprintln!("IPv6 routes (from the router advertisement):\n{routes}");
    let default_via_router = routes.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 10 && f[0] == "0".repeat(32) && f[1] == "00" && f[4].starts_with("fe80") && f[9] == "eth0"
    });
    assert!(default_via_router, "no default route via the router's link-local address (accept_ra)");
    println!("CHILD-OK address={} mac={}", lease.address, link.mac_string());
}

/// The HTTP server half: one request on [fd12:3456::1]:8080, answered with [`BODY`].
#[test]
#[ignore = "the HTTP server of dhcp6_dns_and_http_over_ipv6_in_network_namespaces"]
fn http_server_in_namespace() {
    use std::io::{BufRead, BufReader, Write};
    if std::env::var(CHILD_ENV).is_err() {
        return testing::cannot_run(HTTP_TEST, &format!("it only runs as a child of {TEST}"));
    }
    let listener = TcpListener::bind((SERVER, HTTP_PORT)).unwrap();
    println!("SERVING");
    let (stream, peer) = listener.accept().unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 && !line.ends_with("\r\n\r\n") {}
    println!("from {peer}:\n{line}");
    let mut w = stream;
    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}", BODY.len())
        .unwrap();
}
