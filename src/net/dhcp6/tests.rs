use super::*;
use std::collections::VecDeque;

const STATUS_NO_BINDING: u16 = 3;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SERVER_DUID: &[u8] = &[0, 3, 0, 1, 2, 0, 0, 0, 0, 1];
const SERVER_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

fn addr(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn ia_addr_option(a: &str, preferred: u32, valid: u32) -> Vec<u8> {
    let mut d = addr(a).octets().to_vec();
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&valid.to_be_bytes());
    d
}

fn ia_na(iaid: u32, t1: u32, t2: u32, inner: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut d = iaid.to_be_bytes().to_vec();
    d.extend_from_slice(&t1.to_be_bytes());
    d.extend_from_slice(&t2.to_be_bytes());
    for (c, data) in inner {
        put_option(&mut d, *c, data);
    }
    d
}

fn names(list: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in list {
        for label in n.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }
    out
}

/// A server's answer (Advertise or Reply) granting `a` for 600/300 s with T1 100, T2 200.
fn answer(kind: u8, xid: u32, a: &str, extra: &[(u16, Vec<u8>)]) -> Message {
    let mut dns = addr("2001:db8::53").octets().to_vec();
    dns.extend_from_slice(&addr("fe80::53").octets());
    let mut options = vec![
        (OPT_CLIENTID, duid_ll(MAC)),
        (OPT_SERVERID, SERVER_DUID.to_vec()),
        (OPT_IA_NA, ia_na(iaid_of(MAC), 100, 200, &[(OPT_IAADDR, ia_addr_option(a, 300, 600))])),
        (OPT_DNS_SERVERS, dns),
        (OPT_DOMAIN_LIST, names(&["berth.test", "example.org"])),
    ];
    options.extend_from_slice(extra);
    Message { kind, xid, options }
}

type Respond = Box<dyn FnMut(&Message) -> Vec<(Message, Ipv6Addr)>>;

struct FakeServer {
    respond: Respond,
    queue: VecDeque<(Vec<u8>, Ipv6Addr)>,
    sent: Vec<Message>,
}

impl FakeServer {
    fn new(respond: impl FnMut(&Message) -> Vec<(Message, Ipv6Addr)> + 'static) -> FakeServer {
        FakeServer { respond: Box::new(respond), queue: VecDeque::new(), sent: Vec::new() }
    }
}

impl Transport for &mut FakeServer {
    fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        let m = parse(packet).expect("the client sends parseable messages");
        for (r, from) in (self.respond)(&m) {
            self.queue.push_back((encode(&r), from));
        }
        self.sent.push(m);
        Ok(())
    }

    fn recv(&mut self, _timeout: Duration) -> io::Result<Option<(Vec<u8>, Ipv6Addr)>> {
        Ok(self.queue.pop_front())
    }
}

fn timing() -> Timing {
    Timing { budget: Duration::from_millis(200), rapid_commit: false, scale: 0.001 }
}

/// A well-behaved server: Advertise to Solicit (Reply with rapid commit when asked and
/// `rapid`), Reply to Request, Renew and Rebind.
fn server(rapid: bool) -> impl FnMut(&Message) -> Vec<(Message, Ipv6Addr)> {
    move |m| match m.kind {
        SOLICIT if rapid && m.option(OPT_RAPID_COMMIT).is_some() => {
            vec![(answer(REPLY, m.xid, "2001:db8::100", &[(OPT_RAPID_COMMIT, vec![])]), SERVER_LL)]
        }
        SOLICIT => vec![(answer(ADVERTISE, m.xid, "2001:db8::100", &[]), SERVER_LL)],
        REQUEST | RENEW | REBIND => vec![(answer(REPLY, m.xid, "2001:db8::100", &[]), SERVER_LL)],
        _ => vec![],
    }
}

fn option_codes(m: &Message) -> Vec<u16> {
    m.options.iter().map(|(c, _)| *c).collect()
}

#[test]
fn messages_round_trip_with_a_24_bit_transaction_id() {
    let m = solicit(0xabcdef, &duid_ll(MAC), 7, Duration::from_millis(1234), true);
    let bytes = encode(&m);
    assert_eq!(&bytes[..4], &[SOLICIT, 0xab, 0xcd, 0xef]);
    assert_eq!(parse(&bytes).unwrap(), m);
    assert_eq!(m.option(OPT_ELAPSED_TIME), Some(&[0, 123][..]));
    assert_eq!(m.option(OPT_ORO), Some(&[0, 23, 0, 24][..]));
    assert_eq!(m.option(OPT_CLIENTID), Some(&[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56][..]));
    let long = solicit(1, &duid_ll(MAC), 7, Duration::from_secs(100_000), false);
    assert_eq!(long.option(OPT_ELAPSED_TIME), Some(&[0xff, 0xff][..]), "elapsed time saturates");
    assert_eq!(iaid_of(MAC), 0x0012_3456);
}

#[test]
fn malformed_messages_are_errors_not_panics() {
    assert_eq!(parse(&[]), Err(ParseError::Short(0)));
    assert_eq!(parse(&[7, 0, 0]), Err(ParseError::Short(3)));
    assert!(parse(&[7, 0, 0, 1]).unwrap().options.is_empty());
    // An option header cut short, and an option whose length runs past the end.
    assert_eq!(parse(&[7, 0, 0, 1, 0, 1, 0]), Err(ParseError::Truncated { code: 1, at: 0 }));
    assert_eq!(parse(&[7, 0, 0, 1, 0, 2, 0, 9, 1, 2]), Err(ParseError::Truncated { code: 2, at: 0 }));
    // IA_NA and IAADDR too short; a status code without its code.
    assert!(matches!(parse_ia_na(&[0; 11]), Err(ParseError::BadLength { code: OPT_IA_NA, .. })));
    let short_addr = ia_na(1, 0, 0, &[(OPT_IAADDR, vec![0; 23])]);
    assert!(matches!(parse_ia_na(&short_addr), Err(ParseError::BadLength { code: OPT_IAADDR, .. })));
    let bad_inner = {
        let mut d = ia_na(1, 0, 0, &[]);
        d.extend_from_slice(&[0, 5, 0, 30, 1]);
        d
    };
    assert!(matches!(parse_ia_na(&bad_inner), Err(ParseError::Truncated { .. })));
    assert!(parse_status(&[0]).is_err());
    assert_eq!(parse_status(&[0, 2, b'n', b'o', b'\n']).unwrap(), (2, "no".to_string()));
    // DNS servers not a multiple of 16 bytes.
    assert!(parse_dns(&[0; 17]).is_err());
    assert!(parse_dns(&[]).unwrap().is_empty());
    // Domain lists: unterminated, compression pointer, label past the end, not a host name.
    for bad in [
        &b"\x05berth\x04test"[..],
        &b"\x05berth\xc0\x0c"[..],
        &b"\x09berth"[..],
        &b"\x04a\nbc\x00"[..],
        &b"\x03a b\x00"[..],
    ] {
        assert!(parse_domain_list(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_domain_list(&names(&["a.b", "c", "a.b"])).unwrap(), vec!["a.b", "c"]);
    assert_eq!(parse_domain_list(&[0]).unwrap(), Vec::<String>::new());

    // Every truncation of a good Reply parses or fails cleanly, and so does every one-byte
    // corruption of it; nothing panics.
    let good = encode(&answer(REPLY, 5, "2001:db8::100", &[]));
    let duid = duid_ll(MAC);
    let check = |b: &[u8]| {
        if let Ok(m) = parse(b) {
            let _ = lease_from_reply(&m, &duid, iaid_of(MAC), SERVER_LL, Instant::now());
        }
    };
    for n in 0..good.len() {
        check(&good[..n]);
    }
    for i in 0..good.len() {
        for v in [0u8, 1, 0x3f, 0x40, 0x7f, 0xc0, 0xff] {
            let mut b = good.clone();
            b[i] = v;
            check(&b);
        }
    }
}

#[test]
fn a_reply_becomes_a_lease_only_when_it_is_for_us_and_usable() {
    let duid = duid_ll(MAC);
    let iaid = iaid_of(MAC);
    let now = Instant::now();
    let take = |m: &Message| lease_from_reply(m, &duid, iaid, SERVER_LL, now);

    let lease = take(&answer(REPLY, 1, "2001:db8::100", &[])).unwrap();
    assert_eq!(lease.address, addr("2001:db8::100"));
    assert_eq!((lease.preferred, lease.valid, lease.t1, lease.t2), (300, 600, 100, 200));
    assert_eq!(lease.dns, vec![addr("2001:db8::53"), addr("fe80::53")]);
    assert_eq!(lease.search, vec!["berth.test", "example.org"]);
    assert_eq!(lease.server_id, SERVER_DUID);
    assert_eq!(lease.server, SERVER_LL);
    assert_eq!(lease.lifetimes_at(now + Duration::from_secs(100)), (500, 200));
    assert_eq!(lease.lifetimes_at(now + Duration::from_secs(400)), (200, 0));

    let mut m = answer(REPLY, 1, "2001:db8::100", &[]);
    m.options[0].1 = duid_ll([2; 6]);
    assert!(matches!(take(&m), Err(Refusal::Ignore(why)) if why.contains("client id")));
    let mut m = answer(REPLY, 1, "2001:db8::100", &[]);
    m.options.remove(1);
    assert!(matches!(take(&m), Err(Refusal::Ignore(why)) if why.contains("server id")));
    let m = answer(REPLY, 1, "2001:db8::100", &[(OPT_STATUS_CODE, vec![0, 2, b'n', b'o'])]);
    assert_eq!(take(&m), Err(Refusal::Status(STATUS_NO_ADDRS_AVAIL, "no".into())));

    // Our IA: another IAID only; a NoBinding status in it; T1 after T2; zero T1/T2; an
    // address whose preferred lifetime exceeds its valid one; a link-local address.
    let with_ia = |ia: Vec<u8>| {
        let mut m = answer(REPLY, 1, "2001:db8::100", &[]);
        m.options[2].1 = ia;
        m
    };
    let good_addr = || vec![(OPT_IAADDR, ia_addr_option("2001:db8::7", 300, 600))];
    assert!(matches!(take(&with_ia(ia_na(iaid + 1, 0, 0, &good_addr()))), Err(Refusal::Ignore(_))));
    let no_binding = ia_na(iaid, 0, 0, &[(OPT_STATUS_CODE, vec![0, 3])]);
    assert_eq!(take(&with_ia(no_binding)), Err(Refusal::Status(STATUS_NO_BINDING, String::new())));
    assert!(
        matches!(take(&with_ia(ia_na(iaid, 300, 200, &good_addr()))), Err(Refusal::Ignore(why)) if why.contains("T1"))
    );
    let defaults = take(&with_ia(ia_na(iaid, 0, 0, &good_addr()))).unwrap();
    assert_eq!((defaults.t1, defaults.t2), (150, 240));
    let forever =
        take(&with_ia(ia_na(iaid, 0, 0, &[(OPT_IAADDR, ia_addr_option("2001:db8::7", INFINITY, INFINITY))])))
            .unwrap();
    assert_eq!((forever.t1, forever.t2, forever.expires_at()), (INFINITY, INFINITY, None));
    assert_eq!(state_at(&forever, now), State::Bound(None));
    let inverted = ia_na(iaid, 0, 0, &[(OPT_IAADDR, ia_addr_option("2001:db8::7", 601, 600))]);
    assert!(matches!(take(&with_ia(inverted)), Err(Refusal::Status(STATUS_NO_ADDRS_AVAIL, _))));
    let link_local = ia_na(iaid, 0, 0, &[(OPT_IAADDR, ia_addr_option("fe80::7", 300, 600))]);
    assert!(matches!(take(&with_ia(link_local)), Err(Refusal::Status(STATUS_NO_ADDRS_AVAIL, _))));
    // A bad search list makes the reply unusable rather than half-applied.
    let m = answer(REPLY, 1, "2001:db8::100", &[]);
    let mut bad = m.clone();
    bad.options[4].1 = b"\x03a;b\x00".to_vec();
    assert!(matches!(take(&bad), Err(Refusal::Ignore(_))));
}

#[test]
fn solicit_advertise_request_reply() {
    let mut srv = FakeServer::new(server(false));
    let lease = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap();
    assert_eq!(lease.address, addr("2001:db8::100"));
    let kinds: Vec<u8> = srv.sent.iter().map(|m| m.kind).collect();
    assert_eq!(kinds, vec![SOLICIT, REQUEST]);
    let (sol, req) = (&srv.sent[0], &srv.sent[1]);
    assert_eq!(option_codes(sol), vec![OPT_CLIENTID, OPT_ELAPSED_TIME, OPT_ORO, OPT_IA_NA]);
    assert_eq!(sol.option(OPT_ELAPSED_TIME), Some(&[0, 0][..]), "the first message's elapsed time is 0");
    let ia = parse_ia_na(sol.option(OPT_IA_NA).unwrap()).unwrap();
    assert_eq!((ia.iaid, ia.addresses.len()), (iaid_of(MAC), 0));
    assert_eq!(req.option(OPT_SERVERID), Some(SERVER_DUID));
    let ia = parse_ia_na(req.option(OPT_IA_NA).unwrap()).unwrap();
    assert_eq!(ia.addresses[0].address, addr("2001:db8::100"));
    assert_ne!(sol.xid, req.xid, "a new exchange, a new transaction id");
    assert!(sol.xid <= 0xff_ffff);
}

#[test]
fn rapid_commit_takes_the_reply_to_the_solicit() {
    let mut srv = FakeServer::new(server(true));
    let t = Timing { rapid_commit: true, ..timing() };
    let lease = Client::new(&mut srv, "eth0", MAC, t).acquire().unwrap();
    assert_eq!(lease.address, addr("2001:db8::100"));
    assert_eq!(srv.sent.len(), 1);
    assert!(srv.sent[0].option(OPT_RAPID_COMMIT).is_some());
    // Without asking, a Reply to the Solicit is not taken: the server's rapid-commit answer is
    // ignored and the exchange times out.
    let mut srv = FakeServer::new(move |m: &Message| {
        vec![(answer(REPLY, m.xid, "2001:db8::100", &[(OPT_RAPID_COMMIT, vec![])]), SERVER_LL)]
    });
    let err = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap_err();
    assert!(matches!(err, Error::Timeout { phase: "Solicit", .. }), "{err}");
}

#[test]
fn the_most_preferred_advertise_wins_and_strangers_are_ignored() {
    let mut srv = FakeServer::new(|m: &Message| {
        if m.kind != SOLICIT {
            let mut r = answer(REPLY, m.xid, "2001:db8::200", &[]);
            r.options[1].1 = vec![9, 9];
            return vec![(r, SERVER_LL)];
        }
        let mut low = answer(ADVERTISE, m.xid, "2001:db8::100", &[(OPT_PREFERENCE, vec![10])]);
        low.options[1].1 = vec![1, 1];
        let mut high = answer(ADVERTISE, m.xid, "2001:db8::200", &[(OPT_PREFERENCE, vec![200])]);
        high.options[1].1 = vec![9, 9];
        let stranger = answer(ADVERTISE, m.xid ^ 1, "2001:db8::300", &[(OPT_PREFERENCE, vec![255])]);
        vec![
            (low, SERVER_LL),
            (stranger, SERVER_LL),
            (high, SERVER_LL),
            (Message { kind: 99, xid: m.xid, options: vec![] }, SERVER_LL),
        ]
    });
    let lease = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap();
    assert_eq!(lease.address, addr("2001:db8::200"));
    assert_eq!(srv.sent[1].option(OPT_SERVERID), Some(&[9, 9][..]));
}

#[test]
fn refusals_and_silence_end_in_clear_errors() {
    let mut srv = FakeServer::new(|_: &Message| vec![]);
    let err = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap_err();
    assert!(matches!(err, Error::Timeout { phase: "Solicit", .. }), "{err}");
    assert!(err.to_string().contains("is there a DHCPv6 server"), "{err}");
    assert!(srv.sent.len() > 1, "it retransmits");
    assert!(srv.sent.iter().all(|m| m.xid == srv.sent[0].xid), "retransmissions keep the transaction id");

    let mut srv = FakeServer::new(|m: &Message| match m.kind {
        SOLICIT => vec![(answer(ADVERTISE, m.xid, "2001:db8::100", &[]), SERVER_LL)],
        _ => vec![(answer(REPLY, m.xid, "2001:db8::100", &[(OPT_STATUS_CODE, vec![0, 2])]), SERVER_LL)],
    });
    let err = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap_err();
    assert!(matches!(err, Error::Refused { status: STATUS_NO_ADDRS_AVAIL, .. }), "{err}");
    assert_eq!(srv.sent.iter().filter(|m| m.kind == REQUEST).count(), MAX_REFUSALS as usize);

    // An Advertise without an address is no offer.
    let mut srv = FakeServer::new(|m: &Message| {
        vec![(answer(ADVERTISE, m.xid, "2001:db8::100", &[(OPT_STATUS_CODE, vec![0, 2])]), SERVER_LL)]
    });
    let err = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap_err();
    assert!(matches!(err, Error::Timeout { phase: "Solicit", .. }), "{err}");
}

#[test]
fn renew_goes_to_the_server_and_rebind_to_any() {
    let mut srv = FakeServer::new(server(false));
    let lease = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap();
    let until = Instant::now() + Duration::from_millis(100);
    for rebinding in [false, true] {
        let got = Client::new(&mut srv, "eth0", MAC, timing()).renew(&lease, rebinding, until).unwrap();
        let Renewal::Renewed(new) = got else { panic!("{got:?}") };
        assert!(!new.differs_in_config(&lease));
        let sent = srv.sent.last().unwrap();
        assert_eq!(sent.kind, if rebinding { REBIND } else { RENEW });
        assert_eq!(sent.option(OPT_SERVERID).is_some(), !rebinding);
        let ia = parse_ia_na(sent.option(OPT_IA_NA).unwrap()).unwrap();
        assert_eq!(ia.addresses[0].address, lease.address);
    }
    // NoBinding: the address is lost. Silence: no answer by the deadline.
    let mut srv = FakeServer::new(|m: &Message| {
        let mut r = answer(REPLY, m.xid, "2001:db8::100", &[]);
        r.options[2].1 = ia_na(iaid_of(MAC), 0, 0, &[(OPT_STATUS_CODE, vec![0, 3])]);
        vec![(r, SERVER_LL)]
    });
    let got = Client::new(&mut srv, "eth0", MAC, timing()).renew(&lease, false, until).unwrap();
    assert!(matches!(got, Renewal::Lost(ref why) if why.contains("status 3")), "{got:?}");
    let mut srv = FakeServer::new(|_: &Message| vec![]);
    let soon = Instant::now() + Duration::from_millis(30);
    assert_eq!(
        Client::new(&mut srv, "eth0", MAC, timing()).renew(&lease, true, soon).unwrap(),
        Renewal::NoAnswer
    );
}

#[test]
fn retransmission_times_follow_rfc_8415() {
    let b = REQUEST_BACKOFF;
    assert_eq!(next_timeout(b, None, 0.0), Duration::from_secs(1));
    assert_eq!(next_timeout(b, None, 0.1), Duration::from_millis(1100));
    assert_eq!(next_timeout(b, Some(Duration::from_secs(4)), -0.1), Duration::from_millis(7600));
    assert_eq!(next_timeout(b, Some(Duration::from_secs(20)), 0.0), Duration::from_secs(30));
    assert_eq!(next_timeout(b, Some(Duration::from_secs(30)), -0.1), Duration::from_secs(27));
    for _ in 0..100 {
        let r = rand_factor(false);
        assert!((-0.1..=0.1).contains(&r), "{r}");
        let p = rand_factor(true);
        assert!(p > 0.0 && p <= 0.1, "{p}");
    }
}

#[test]
fn lease_states_over_time() {
    let t0 = Instant::now();
    let lease =
        lease_from_reply(&answer(REPLY, 1, "2001:db8::1", &[]), &duid_ll(MAC), iaid_of(MAC), SERVER_LL, t0)
            .unwrap();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(state_at(&lease, at(0)), State::Bound(Some(at(100))));
    assert_eq!(state_at(&lease, at(150)), State::Renewing(at(200)));
    assert_eq!(state_at(&lease, at(300)), State::Rebinding(Some(at(600))));
    assert_eq!(state_at(&lease, at(600)), State::Expired);
}

#[test]
fn resolv_conf_merges_both_families() {
    let lease = lease_from_reply(
        &answer(REPLY, 1, "2001:db8::1", &[]),
        &duid_ll(MAC),
        iaid_of(MAC),
        SERVER_LL,
        Instant::now(),
    )
    .unwrap();
    let v4 = "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\nsearch berth.test\n\
              nameserver 10.0.2.3\nnameserver 10.0.2.4\n";
    assert_eq!(
        resolv_conf(v4, "eth0", &lease),
        "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\n\
         # Written by berth from the DHCPv6 lease of eth0 (server fe80::1)\n\
         search berth.test example.org\n\
         nameserver 10.0.2.3\nnameserver 2001:db8::53\nnameserver 10.0.2.4\n"
    );
    // IPv6 only (no IPv4 lease yet, or none at all): the link-local server gets its scope.
    let v6_only = resolv_conf("", "eth0", &lease);
    assert_eq!(
        v6_only,
        "# Written by berth from the DHCPv6 lease of eth0 (server fe80::1)\nsearch berth.test example.org\n\
         nameserver 2001:db8::53\nnameserver fe80::53%eth0\n"
    );
    let none = Lease { dns: vec![], search: vec![], ..lease };
    let text = resolv_conf("# x\n# no name servers are known\n", "eth0", &none);
    assert_eq!(text, "# x\n# Written by berth from the DHCPv6 lease of eth0 (server fe80::1)\n# no name servers are known\n");
}

#[test]
fn decline_names_the_address_and_waits_for_the_reply() {
    let mut srv = FakeServer::new(server(false));
    let lease = Client::new(&mut srv, "eth0", MAC, timing()).acquire().unwrap();
    let mut srv =
        FakeServer::new(|m: &Message| vec![(answer(REPLY, m.xid, "2001:db8::100", &[]), SERVER_LL)]);
    Client::new(&mut srv, "eth0", MAC, timing()).decline(&lease).unwrap();
    assert_eq!(srv.sent.len(), 1);
    let d = &srv.sent[0];
    assert_eq!(d.kind, DECLINE);
    assert_eq!(d.option(OPT_SERVERID), Some(SERVER_DUID));
    assert_eq!(parse_ia_na(d.option(OPT_IA_NA).unwrap()).unwrap().addresses[0].address, lease.address);
    // Unanswered: DEC_MAX_RC transmissions, then give up (not an error: the address is gone).
    let mut srv = FakeServer::new(|_: &Message| vec![]);
    Client::new(&mut srv, "eth0", MAC, timing()).decline(&lease).unwrap();
    assert_eq!(srv.sent.len(), DEC_MAX_RC as usize);
    // Decline's timeouts double without a cap (MRT 0).
    assert_eq!(next_timeout(DECLINE_BACKOFF, Some(Duration::from_secs(8)), 0.0), Duration::from_secs(16));
}
