//! The keeper against real NTP servers on the loopback, with a fake clock (a host test must
//! never set the host's clock): a small server of the tests that can also answer wrongly, and
//! Debian's chronyd (fetched by scripts/setup) as a real, independent implementation.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use super::fake::{Event, FakeClock};
use super::sntp::{NtpTime, Packet, MODE_SERVER};
use super::*;

const S: i64 = 1_000_000_000;

/// How the test server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// The true time plus a skew.
    Good(i64),
    Silent,
    /// Seven bytes of nothing.
    Garbage,
    Kiss(&'static [u8; 4]),
    /// Leap indicator 3: "my clock is not synchronised".
    Unsynchronised,
    /// An answer that is not to our request (wrong origin) first, then the right one.
    SpoofFirst,
}

struct TestServer {
    addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(bind: &str, b: Behaviour) -> TestServer {
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = sock.local_addr().unwrap();
        let behaviour = Arc::new(Mutex::new(b));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (bh, rq, st) = (behaviour.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                let received = realtime_ns();
                rq.fetch_add(1, Ordering::Relaxed);
                let Ok(req) = Packet::decode(&buf[..n]) else { continue };
                let answer = |origin: NtpTime, skew: i64, stratum: u8, leap: u8, refid: [u8; 4]| {
                    let mut p = Packet {
                        leap,
                        version: 4,
                        mode: MODE_SERVER,
                        stratum,
                        poll: 6,
                        precision: -20,
                        reference_id: refid,
                        reference: NtpTime::from_unix_ns(received + skew - S),
                        origin,
                        receive: NtpTime::from_unix_ns(received + skew),
                        transmit: NtpTime::from_unix_ns(realtime_ns() + skew),
                        ..Default::default()
                    };
                    p.set_root(1_000_000, 1_000_000);
                    p.encode()
                };
                let b = *bh.lock().unwrap();
                let reply: Vec<Vec<u8>> = match b {
                    Behaviour::Good(skew) => vec![answer(req.transmit, skew, 2, 0, *b"TEST").to_vec()],
                    Behaviour::Silent => vec![],
                    Behaviour::Garbage => vec![vec![0x24, 1, 2, 3, 4, 5, 6]],
                    Behaviour::Kiss(code) => vec![answer(req.transmit, 0, 0, 0, *code).to_vec()],
                    Behaviour::Unsynchronised => vec![answer(req.transmit, 0, 2, 3, *b"TEST").to_vec()],
                    Behaviour::SpoofFirst => vec![
                        answer(NtpTime(req.transmit.0 ^ 1), 3600 * S, 1, 0, *b"EVIL").to_vec(),
                        answer(req.transmit, 0, 2, 0, *b"TEST").to_vec(),
                    ],
                };
                for r in reply {
                    let _ = sock.send_to(&r, from);
                }
            }
        });
        TestServer { addr, behaviour, requests, stop, thread: Some(thread) }
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    fn entry(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn keeper(clock: Arc<FakeClock>, entries: &[String]) -> (Keeper, Arc<Mutex<Status>>) {
    let status = Arc::new(Mutex::new(Status::default()));
    let mut k = Keeper::new(clock, None, status.clone());
    k.timeout = Duration::from_millis(300);
    assert!(k.set_servers(entries.to_vec()));
    (k, status)
}

fn steps(c: &FakeClock) -> Vec<i64> {
    c.events().iter().filter_map(|e| if let Event::Step(o) = e { Some(*o) } else { None }).collect()
}

fn near(got: i64, want: i64, what: &str) {
    // Loopback round trips are well under 50 ms even on a loaded machine.
    assert!((got - want).abs() < S / 20, "{what}: {got} ns, want about {want}");
}

#[test]
fn the_first_answer_steps_a_far_off_clock_then_small_offsets_are_slewed() {
    let srv = TestServer::start("127.0.0.1:0", Behaviour::Good(0));
    let clock = FakeClock::new(-1000 * S, None);
    let (mut k, status) = keeper(clock.clone(), &[srv.entry()]);
    assert_eq!(k.poll_once(), POLL_MIN);
    let s = steps(&clock);
    assert_eq!(s.len(), 1, "{:?}", clock.events());
    near(s[0], 1000 * S, "the step");
    near(clock.skew(), 0, "the clock after the step");
    assert!(
        matches!(clock.events().last(), Some(Event::Slew(0))),
        "a step is followed by marking synchronised"
    );
    let st = status.lock().unwrap().report(clock.as_ref());
    assert_eq!(st["synchronized"], true, "{st}");
    assert_eq!(st["steps"], 1);
    assert!(st["server"].as_str().unwrap().contains(&srv.entry()), "{st}");
    assert!((st["last_step"]["by_s"].as_f64().unwrap() - 1000.0).abs() < 0.05, "{st}");

    // 100 ms off: below the step threshold, handed to the kernel's PLL.
    *clock.skew_ns.lock().unwrap() = -S / 10;
    k.poll_once();
    assert_eq!(steps(&clock).len(), 1, "no second step");
    match clock.events().last() {
        Some(Event::Slew(o)) => near(*o, S / 10, "the slewed offset"),
        e => panic!("expected a slew, got {e:?}"),
    }
    // Offsets under 50 ms let the interval grow, up to the maximum.
    *clock.skew_ns.lock().unwrap() = 0;
    let mut waits = Vec::new();
    for _ in 0..7 {
        waits.push(k.poll_once().as_secs());
    }
    assert_eq!(waits, [64, 128, 256, 512, 1024, 1024, 1024]);
    assert_eq!(status.lock().unwrap().report(clock.as_ref())["poll_interval_s"], 1024);
}

#[test]
fn a_later_large_offset_is_stepped_only_when_a_second_answer_confirms_it() {
    let srv = TestServer::start("127.0.0.1:0", Behaviour::Good(0));
    let clock = FakeClock::new(0, None);
    let (mut k, status) = keeper(clock.clone(), &[srv.entry()]);
    k.poll_once();
    assert!(steps(&clock).is_empty(), "a clock already right is not stepped");

    // One wrong answer (an hour ahead) while synchronised: measured again, not stepped.
    srv.set(Behaviour::Good(3600 * S));
    assert_eq!(k.poll_once(), CONFIRM_WAIT);
    assert!(steps(&clock).is_empty());
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!((st["pending_step_s"].as_f64().unwrap() - 3600.0).abs() < 0.1, "{st}");
    // The next answer is right again: nothing to confirm, the small offset is slewed.
    srv.set(Behaviour::Good(0));
    k.poll_once();
    assert!(steps(&clock).is_empty(), "{:?}", clock.events());
    assert!(status.lock().unwrap().pending_step_ns.is_none());

    // The clock really jumps (a VM paused for 5 s): two answers agree, and it is stepped.
    *clock.skew_ns.lock().unwrap() = -5 * S;
    assert_eq!(k.poll_once(), CONFIRM_WAIT);
    assert!(steps(&clock).is_empty());
    assert_eq!(k.poll_once(), POLL_MIN);
    let s = steps(&clock);
    assert_eq!(s.len(), 1);
    near(s[0], 5 * S, "the confirmed step");
    near(clock.skew(), 0, "the clock");
}

#[test]
fn a_keeper_started_again_keeps_its_state() {
    let srv = TestServer::start("127.0.0.1:0", Behaviour::Good(0));
    let clock = FakeClock::new(-1000 * S, None);
    let (mut k, status) = keeper(clock.clone(), &[srv.entry()]);
    k.poll_once();
    drop(k);
    // What the task supervisor does after a panic: a new keeper on the same state.
    let mut k = Keeper::new(clock.clone(), None, status.clone());
    k.timeout = Duration::from_millis(300);
    k.set_servers(vec![srv.entry()]);
    *clock.skew_ns.lock().unwrap() = -5 * S;
    assert_eq!(k.poll_once(), CONFIRM_WAIT, "not the first answer since boot: a step needs confirming");
    assert_eq!(steps(&clock).len(), 1);
    assert_eq!(status.lock().unwrap().steps, 1);
}

#[test]
fn servers_are_tried_in_turn_and_bad_answers_are_named() {
    let silent = TestServer::start("127.0.0.1:0", Behaviour::Silent);
    let garbage = TestServer::start("127.0.0.1:0", Behaviour::Garbage);
    let unsync = TestServer::start("127.0.0.1:0", Behaviour::Unsynchronised);
    let rate = TestServer::start("127.0.0.1:0", Behaviour::Kiss(b"RATE"));
    let good = TestServer::start("127.0.0.1:0", Behaviour::Good(0));
    let entries: Vec<String> = [&silent, &garbage, &unsync, &rate, &good].iter().map(|s| s.entry()).collect();
    let clock = FakeClock::new(-2 * S, None);
    let (mut k, status) = keeper(clock.clone(), &entries);
    k.poll_once();
    assert_eq!(steps(&clock).len(), 1);
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!(st["server"].as_str().unwrap().starts_with(&good.entry()), "{st}");
    let errors: Vec<String> = st["last_attempt"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let want = [
        (&silent, "no answer within 0.3 s"),
        (&garbage, "7 bytes, shorter than an NTP header"),
        (&unsync, "unsynchronised (leap indicator 3)"),
        (&rate, "kiss-o'-death RATE"),
    ];
    for (srv, text) in want {
        assert!(
            errors.iter().any(|e| e.starts_with(&srv.entry()) && e.contains(text)),
            "no error '{text}' for {}: {errors:?}",
            srv.entry()
        );
    }
    assert_eq!(st["last_attempt"]["ok"], true);

    // The good server is asked first from now on; when it falls silent the others are tried
    // again, except the one that asked us to slow down.
    let before = rate.requests.load(Ordering::Relaxed);
    k.poll_once();
    assert_eq!(good.requests.load(Ordering::Relaxed), 2);
    assert_eq!(silent.requests.load(Ordering::Relaxed), 1, "the preferred server answered first");
    good.set(Behaviour::Silent);
    let wait = k.poll_once();
    assert_eq!(wait, FAIL_WAIT, "the first failed poll is retried soon");
    assert_eq!(rate.requests.load(Ordering::Relaxed), before, "a server that sent RATE is held off");
    let st = status.lock().unwrap().report(clock.as_ref());
    assert_eq!(st["last_attempt"]["ok"], false);
    assert!(st["last_attempt"]["errors"].to_string().contains("held off"), "{st}");
    assert_eq!(k.poll_once(), FAIL_WAIT * 2, "failed polls back off");
    assert_eq!(k.poll_once(), FAIL_WAIT * 4);
}

#[test]
fn deny_holds_a_server_off_and_a_spoofed_answer_is_ignored() {
    let deny = TestServer::start("127.0.0.1:0", Behaviour::Kiss(b"DENY"));
    let clock = FakeClock::new(0, None);
    let (mut k, status) = keeper(clock.clone(), &[deny.entry()]);
    assert_eq!(k.poll_once(), FAIL_WAIT);
    assert_eq!(deny.requests.load(Ordering::Relaxed), 1);
    // Every server held off: the keeper waits for the hold (a day), bounded by the maximum.
    assert_eq!(k.poll_once(), POLL_MAX);
    assert_eq!(deny.requests.load(Ordering::Relaxed), 1, "DENY is obeyed");
    assert!(status.lock().unwrap().last_sync.is_none());

    // An answer that does not carry our nonce (a spoofer's, an hour off) is ignored; the
    // real one that follows is used.
    let spoof = TestServer::start("127.0.0.1:0", Behaviour::SpoofFirst);
    assert!(k.set_servers(vec![spoof.entry()]), "a changed setting forgets the holds");
    k.poll_once();
    assert!(steps(&clock).is_empty(), "{:?}", clock.events());
    assert!(
        matches!(clock.events().last(), Some(Event::Slew(o)) if o.abs() < S / 20),
        "{:?}",
        clock.events()
    );
}

#[test]
fn an_answer_before_the_build_time_is_refused() {
    let srv = TestServer::start("127.0.0.1:0", Behaviour::Good(-365 * 86_400 * S));
    let clock = FakeClock::new(0, None);
    let status = Arc::new(Mutex::new(Status::default()));
    let build = Timestamp::from_nanosecond((realtime_ns() - 86_400 * S) as i128).unwrap();
    let mut k = Keeper::new(clock.clone(), Some(build), status.clone());
    k.timeout = Duration::from_millis(300);
    k.set_servers(vec![srv.entry()]);
    k.poll_once();
    assert!(clock.events().is_empty(), "{:?}", clock.events());
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!(st["last_attempt"]["errors"].to_string().contains("before this image was built"), "{st}");
    assert_eq!(st["synchronized"], false);
}

#[test]
fn ipv6_addresses_and_names_through_the_resolver() {
    let v6 = TestServer::start("[::1]:0", Behaviour::Good(0));
    let v4 = TestServer::start("127.0.0.1:0", Behaviour::Good(0));
    for entry in [v6.entry(), format!("localhost:{}", v4.addr.port())] {
        let clock = FakeClock::new(-10 * S, None);
        let (mut k, status) = keeper(clock.clone(), std::slice::from_ref(&entry));
        k.poll_once();
        assert_eq!(steps(&clock).len(), 1, "{entry}: {:?}", status.lock().unwrap().last_attempt);
        near(clock.skew(), 0, &entry);
    }
}

#[test]
fn no_servers_and_bad_entries_are_reported() {
    let clock = FakeClock::new(0, None);
    let status = Arc::new(Mutex::new(Status::default()));
    let mut k = Keeper::new(clock.clone(), None, status.clone());
    assert!(k.set_servers(vec![]), "the first reading counts, even when empty");
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!(st["note"].as_str().unwrap().contains("no time servers configured"), "{st}");
    k.set_servers(vec!["a b".into()]);
    assert_eq!(k.poll_once(), POLL_MAX);
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!(st["note"].as_str().unwrap().contains("'a b'"), "{st}");
    k.set_servers(vec![]);
    let st = status.lock().unwrap().report(clock.as_ref());
    assert!(st["note"].as_str().unwrap().contains("no time servers configured"), "{st}");
    assert!(!k.set_servers(vec![]), "the same list is no change");
    assert!(clock.events().is_empty());
}

#[test]
fn the_servers_are_read_back_from_the_rendered_setting() {
    use crate::settings::model::{Ntp, Settings};
    let entries = vec!["pool.ntp.org".to_string(), "10.0.2.2:12345".into(), "[fd00::1]:1234".into()];
    let s = Settings {
        ntp: Some(Ntp { time_servers: Some(entries.clone()), ..Default::default() }),
        ..Default::default()
    };
    let text = crate::settings::render::render_file("ntp", &s);
    assert_eq!(servers_from_conf(&text), entries);
    let dir = std::env::temp_dir().join(format!("berth-ntpconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ntp.conf");
    let source = conf_source(&path);
    assert_eq!(source(), Ok(vec![]), "no file, no servers");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(source(), Ok(entries));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Debian's chronyd, extracted (not installed) by scripts/setup.
fn chronyd() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_CHRONYD") {
        return p.into();
    }
    let cache = std::env::var_os("BERTH_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
            .join("berth")
    });
    let p = cache.join("chrony/usr/sbin/chronyd");
    assert!(p.exists(), "{} is missing: run scripts/setup (it fetches Debian's chrony)", p.display());
    p
}

/// chronyd serving its (the host's) time on the loopback, never touching the host's clock
/// (`-x`), as an unsynchronised host would serve it (`local stratum 8`).
struct Chronyd(Child, PathBuf);

impl Chronyd {
    fn start(port: u16) -> Chronyd {
        let dir = std::env::temp_dir().join(format!("berth-chronyd-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\ncmdport 0\npidfile {}\n",
                dir.join("chronyd.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new(chronyd())
            .args(["-d", "-x", "-u", "root", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chronyd");
        Chronyd(child, dir)
    }
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn against_chronyd_a_clock_an_hour_behind_is_stepped_and_then_slewed() {
    // A free port: bind one, let it go, give it to chronyd.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _chronyd = Chronyd::start(port);
    let clock = FakeClock::new(-3600 * S, None);
    let (mut k, status) = keeper(clock.clone(), &[format!("127.0.0.1:{port}")]);
    k.timeout = Duration::from_secs(1);
    // chronyd needs a moment to bind: retry for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while steps(&clock).is_empty() && Instant::now() < deadline {
        k.poll_once();
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = status.lock().unwrap().report(clock.as_ref());
    assert_eq!(steps(&clock).len(), 1, "{st}");
    near(steps(&clock)[0], 3600 * S, "the step");
    assert_eq!(st["stratum"], 8, "chronyd's local stratum");
    k.poll_once();
    match clock.events().last() {
        Some(Event::Slew(o)) => near(*o, 0, "the offset after the step"),
        e => panic!("expected a slew, got {e:?}"),
    }
    assert_eq!(steps(&clock).len(), 1);
}
