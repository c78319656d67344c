//! Keeping time: PID 1's own SNTP client (see docs/time.md).
//!
//! The keeper runs in a thread of its own ("time", a supervised task of PID 1). It reads the servers from the rendered
//! `/etc/ntp.conf` (what `settings.ntp.time-servers` was last applied as) every
//! [`SETTINGS_CHECK`], so a change takes effect within seconds of being applied. Each poll asks
//! the servers in turn ([`sntp`]), starting with the one that answered last, and uses the first
//! answer that passes every check:
//! - an offset above [`STEP_THRESHOLD`] is stepped out at once (ADJ_SETOFFSET) on the first
//!   answer since boot; later, a step needs a second answer that agrees within the threshold
//!   (one wrong answer cannot throw a running clock off);
//! - a smaller offset is handed to the kernel's PLL (adjtimex ADJ_OFFSET with STA_PLL). The
//!   kernel slews it out at most 500 ppm and learns the clock's frequency error from successive
//!   offsets, so the clock stays right between polls. A one-shot slew (ADJ_OFFSET_SINGLESHOT)
//!   would correct the phase only and let the drift build up again. The PLL also tells the
//!   kernel the clock is synchronised (STA_UNSYNC off, with an error bound), which the kernel
//!   uses to write the RTC every 11 minutes (CONFIG_RTC_SYSTOHC) and the updater's clock floor
//!   uses to trust the clock ([`floor`]).
//!
//! Polls are [`POLL_MIN`]..[`POLL_MAX`] apart: the interval doubles while offsets are small and
//! drops back to the minimum after a large one. A poll with no usable answer is retried after
//! 2 s, doubling up to [`POLL_MAX`]. A kiss-o'-death RATE holds that server off for twice the
//! interval, DENY or RSTR for a day (or until the setting changes).
//!
//! The clock is reached through the [`Clock`] trait, so the host tests run the real keeper
//! against real servers with a fake clock; only QEMU tests set a real clock. Its state is
//! `GET /system/time` ([`status`]).

pub mod floor;
pub mod sntp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;
use log::{error, info, warn};
use serde_json::{json, Value};

use crate::sys::time::KernelClock;
use sntp::{QueryError, Sample, ServerSpec};

/// Offsets above this are stepped; below, slewed. The kernel's PLL takes at most 0.5 s
/// (MAXPHASE) in one go, so this leaves it room.
pub const STEP_THRESHOLD: Duration = Duration::from_millis(400);
pub const POLL_MIN: Duration = Duration::from_secs(32);
pub const POLL_MAX: Duration = Duration::from_secs(1024);
/// Offsets below this let the interval double; above [`POLL_SHRINK`] it goes back to the minimum.
const POLL_GROW: Duration = Duration::from_millis(50);
const POLL_SHRINK: Duration = Duration::from_millis(200);
/// How soon an unconfirmed large offset is measured again.
const CONFIRM_WAIT: Duration = Duration::from_secs(8);
/// The first wait after a poll with no usable answer (it doubles up to POLL_MAX).
const FAIL_WAIT: Duration = Duration::from_secs(2);
/// How long one server address gets to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// A poll stops asking after this long (servers not reached are named in the errors).
const ROUND_BUDGET: Duration = Duration::from_secs(20);
/// Addresses tried per server name in one poll.
const MAX_ADDRS: usize = 4;
/// Servers used from the setting (the model refuses more).
pub const MAX_SERVERS: usize = 16;
/// How often the rendered setting is read again.
pub const SETTINGS_CHECK: Duration = Duration::from_secs(2);
/// Synchronised means: a sample was used less than this long ago.
const STALE: Duration = Duration::from_secs(3 * 1024);
const HOLD_RATE_MIN: Duration = Duration::from_secs(64);
const HOLD_DENY: Duration = Duration::from_secs(86_400);
/// Errors kept from one poll.
const MAX_ERRORS: usize = 16;
/// The rendered setting is small; more than this is not read.
const MAX_CONF: u64 = 64 * 1024;

/// The system clock, as the keeper and the updater's clock floor use it.
pub trait Clock: Send + Sync {
    /// CLOCK_REALTIME in nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64;
    /// Step the clock by `offset_ns`.
    fn step(&self, offset_ns: i64) -> io::Result<()>;
    /// Slew out `offset_ns` (the kernel PLL, time constant from `poll`) and mark the clock
    /// synchronised within `max_error_ns` (estimated `est_error_ns`).
    fn slew(&self, offset_ns: i64, poll: Duration, max_error_ns: i64, est_error_ns: i64) -> io::Result<()>;
    /// Set the clock to `t` or a little after (the clock floor).
    fn set(&self, t: Timestamp) -> io::Result<()>;
    /// The kernel's maximum error while it counts the clock synchronised; None when it does not.
    fn sync_error(&self) -> Option<Duration>;
    /// The kernel's discipline state, for the API.
    fn kernel(&self) -> Option<KernelClock> {
        None
    }
    fn now(&self) -> Timestamp {
        Timestamp::from_nanosecond(self.now_ns() as i128).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// CLOCK_REALTIME in ns since the epoch (negative before 1970).
pub fn realtime_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// The kernel PLL's time constant for a poll interval: log2(seconds) - 4, as ntpd and
/// systemd-timesyncd use it (32 s → 1, 1024 s → 6).
pub fn time_constant(poll: Duration) -> i64 {
    let secs = poll.as_secs().max(1);
    (63 - secs.leading_zeros() as i64 - 4).clamp(0, 10)
}

/// The real clock (PID 1 only: it needs CAP_SYS_TIME to change anything).
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        realtime_ns()
    }

    fn step(&self, offset_ns: i64) -> io::Result<()> {
        crate::sys::time::step_realtime(offset_ns)
    }

    fn slew(&self, offset_ns: i64, poll: Duration, max_error_ns: i64, est_error_ns: i64) -> io::Result<()> {
        crate::sys::time::discipline(offset_ns, time_constant(poll), max_error_ns / 1000, est_error_ns / 1000)
    }

    fn set(&self, t: Timestamp) -> io::Result<()> {
        // Whole seconds, rounded up: never behind `t`.
        crate::sys::set_realtime(t.as_second() + 1)
    }

    fn sync_error(&self) -> Option<Duration> {
        let k = crate::sys::time::kernel_clock().ok()?;
        k.synchronised().then(|| Duration::from_micros(k.maxerror_us.max(0) as u64))
    }

    fn kernel(&self) -> Option<KernelClock> {
        crate::sys::time::kernel_clock().ok()
    }
}

/// How the last poll went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    pub at_ns: i64,
    pub ok: bool,
    pub errors: Vec<String>,
}

/// The keeper's state, as `GET /system/time` shows it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The configured entries, as written.
    pub servers: Vec<String>,
    /// Why there is nothing to do (no servers, unreadable setting), if so.
    pub note: Option<String>,
    /// The server of the last used sample: "entry (address)".
    pub server: Option<String>,
    pub stratum: Option<u8>,
    pub last_offset_ns: Option<i64>,
    pub last_delay_ns: Option<i64>,
    pub last_distance_ns: Option<i64>,
    /// When the last sample was used: wall clock (after the correction) and monotonic.
    pub last_sync: Option<(i64, Instant)>,
    pub steps: u64,
    /// When the last step was made (wall clock after it) and by how much.
    pub last_step: Option<(i64, i64)>,
    /// A large offset waiting for a second sample to confirm the step.
    pub pending_step_ns: Option<i64>,
    pub poll: Duration,
    pub next_poll: Option<Instant>,
    pub last_attempt: Option<Attempt>,
}

fn secs_f(ns: i64) -> f64 {
    ns as f64 / 1e9
}

impl Status {
    pub fn synchronised(&self) -> bool {
        self.last_sync.is_some_and(|(_, at)| at.elapsed() < STALE)
    }

    /// The JSON of `GET /system/time`, with the clock read now.
    pub fn report(&self, clock: &dyn Clock) -> Value {
        let now = clock.now_ns();
        let kernel = clock.kernel().map(|k| {
            json!({"synchronized": k.synchronised(), "state": k.state, "status": k.status,
                   "max_error_us": k.maxerror_us, "est_error_us": k.esterror_us,
                   "pll_offset_ns": k.offset_ns(), "frequency_ppm": k.freq as f64 / 65536.0,
                   "time_constant": k.constant})
        });
        json!({
            "synchronized": self.synchronised(),
            "servers": self.servers,
            "note": self.note,
            "server": self.server,
            "stratum": self.stratum,
            "last_offset_s": self.last_offset_ns.map(secs_f),
            "last_delay_s": self.last_delay_ns.map(secs_f),
            "root_distance_s": self.last_distance_ns.map(secs_f),
            "last_sync": self.last_sync.map(|(t, _)| sntp::rfc3339(t)),
            "steps": self.steps,
            "last_step": self.last_step.map(|(t, by)| json!({"at": sntp::rfc3339(t), "by_s": secs_f(by)})),
            "pending_step_s": self.pending_step_ns.map(secs_f),
            "poll_interval_s": self.poll.as_secs(),
            "next_poll_in_s": self.next_poll.map(|n| n.saturating_duration_since(Instant::now()).as_secs()),
            "last_attempt": self.last_attempt.as_ref().map(|a| json!({
                "at": sntp::rfc3339(a.at_ns), "ok": a.ok, "errors": a.errors})),
            "clock": sntp::rfc3339(now),
            "clock_unix_s": secs_f(now),
            "kernel": kernel,
        })
    }
}

/// The running keeper's state and clock (one per process: there is one system clock).
static RUNNING: OnceLock<Running> = OnceLock::new();

struct Running {
    status: Arc<Mutex<Status>>,
    clock: Arc<dyn Clock>,
}

/// `GET /system/time`: None when no keeper runs in this process (dev mode).
pub fn status() -> Option<Value> {
    let r = RUNNING.get()?;
    Some(lock(&r.status).report(r.clock.as_ref()))
}

fn lock(s: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// `settings.ntp.options` (chrony's options for each server line, as Bottlerocket passes them):
/// what Berth's SNTP client honours is accepted, the rest refused with the reason.
/// - `iburst`: a quick first synchronisation. Berth's client asks at once when it starts or its
///   servers change and retries a failed poll after 2 s, so it is what the client does anyway.
/// - `prefer`: on every server line (Bottlerocket writes the options on each) it prefers none
///   over another; Berth asks its servers in the order given.
/// - everything else is refused: `minpoll`/`maxpoll` (the client sets its own interval between
///   [`POLL_MIN`] and [`POLL_MAX`]), `key`/`nts` (no authenticated NTP), `maxdelay`,
///   `minstratum`, `polltarget`, `offline`, `xleave`, ... (chrony's selection and tuning, which
///   an SNTP client does not have).
pub fn check_options(options: &[String]) -> Result<(), String> {
    if options.len() > 32 {
        return Err("more than 32 options".into());
    }
    for o in options.iter().flat_map(|o| o.split_whitespace()) {
        match o {
            "iburst" | "prefer" => {}
            "minpoll" | "maxpoll" => {
                return Err(format!(
                    "'{o}' is not supported: Berth's SNTP client sets its own poll interval, {} s to {} s, from the offsets it sees (docs/time.md)",
                    POLL_MIN.as_secs(),
                    POLL_MAX.as_secs()
                ))
            }
            "key" | "nts" => {
                return Err(format!("'{o}' is not supported: Berth's SNTP client has no authenticated NTP"))
            }
            other => {
                return Err(format!(
                    "'{other}' is not supported: Berth's SNTP client honours only iburst and prefer (no chrony source selection or tuning)"
                ))
            }
        }
    }
    Ok(())
}

/// Where the servers come from: the configured entries, or why they cannot be read.
pub type ServerSource = Box<dyn Fn() -> Result<Vec<String>, String> + Send>;

/// The `server NAME ...` entries of an ntp.conf-style file, as settings rendering writes
/// `/etc/ntp.conf` (at most [`MAX_SERVERS`]).
pub fn servers_from_conf(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("server")).then(|| w.next()).flatten().map(String::from)
        })
        .take(MAX_SERVERS)
        .collect()
}

/// A [`ServerSource`] reading `path` (a missing file means no servers).
pub fn conf_source(path: &Path) -> ServerSource {
    let path = path.to_path_buf();
    Box::new(move || {
        use std::io::Read;
        let mut text = String::new();
        match std::fs::File::open(&path) {
            Ok(f) => {
                f.take(MAX_CONF).read_to_string(&mut text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(servers_from_conf(&text))
    })
}

/// The keeper's thread (PID 1 runs it as a supervised task named "time"): it reads its servers
/// from `source` and never returns. Answers with a time before `not_before` (the image's build
/// time) are refused. The state is process-wide, so a keeper started again after a panic keeps
/// the API's history and does not take its first answer as licence to step.
pub fn run(source: ServerSource, clock: Arc<dyn Clock>, not_before: Option<Timestamp>) -> Result<(), String> {
    let shared = RUNNING
        .get_or_init(|| Running { status: Arc::new(Mutex::new(Status::default())), clock: clock.clone() });
    Keeper::new(clock, not_before, shared.status.clone()).run(source)
}

/// A server as the status names it: the entry, and the address it was reached at when the
/// entry is a name.
fn shown(spec: &ServerSpec, addr: SocketAddr) -> String {
    if spec.host.parse::<std::net::IpAddr>().is_ok() {
        spec.to_string()
    } else {
        format!("{spec} ({addr})")
    }
}

/// Keep the first [`MAX_ERRORS`] errors of a poll.
fn push(errors: &mut Vec<String>, e: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(e);
    }
}

/// The SNTP client's state machine; [`Keeper::poll_once`] is one poll.
pub struct Keeper {
    clock: Arc<dyn Clock>,
    not_before_ns: Option<i64>,
    pub timeout: Duration,
    status: Arc<Mutex<Status>>,
    /// The configured entries (None before the first reading).
    entries: Option<Vec<String>>,
    servers: Vec<ServerSpec>,
    /// The index of the server to ask first.
    preferred: usize,
    /// Servers held off after a kiss-o'-death: until when, and the code.
    holds: HashMap<ServerSpec, (Instant, String)>,
    poll: Duration,
    failures: u32,
    /// No sample was used since boot: a large offset is stepped at once.
    first: bool,
    pending_step: Option<i64>,
    source_error: Option<String>,
}

impl Keeper {
    pub fn new(clock: Arc<dyn Clock>, not_before: Option<Timestamp>, status: Arc<Mutex<Status>>) -> Keeper {
        let first = {
            let mut st = lock(&status);
            st.poll = POLL_MIN;
            st.last_sync.is_none()
        };
        Keeper {
            clock,
            not_before_ns: not_before.map(|t| t.as_nanosecond() as i64),
            timeout: QUERY_TIMEOUT,
            status,
            entries: None,
            servers: Vec::new(),
            preferred: 0,
            holds: HashMap::new(),
            poll: POLL_MIN,
            failures: 0,
            first,
            pending_step: None,
            source_error: None,
        }
    }

    /// Take the configured entries; returns whether they changed (then everything learnt
    /// about the old servers is forgotten and the next poll should be now).
    pub fn set_servers(&mut self, entries: Vec<String>) -> bool {
        if self.entries.as_ref() == Some(&entries) {
            return false;
        }
        let mut invalid = Vec::new();
        self.servers = entries
            .iter()
            .filter_map(|e| ServerSpec::parse(e).map_err(|why| invalid.push(why)).ok())
            .collect();
        self.preferred = 0;
        self.holds.clear();
        self.poll = POLL_MIN;
        self.failures = 0;
        self.pending_step = None;
        info!("time: servers {}", if entries.is_empty() { "none".into() } else { entries.join(", ") });
        let mut st = lock(&self.status);
        st.servers = entries.clone();
        self.entries = Some(entries);
        st.poll = self.poll;
        st.pending_step_ns = None;
        st.note = match (self.servers.is_empty(), invalid.is_empty()) {
            (true, true) => Some("no time servers configured (settings.ntp.time-servers)".into()),
            (_, false) => Some(format!("ignored: {}", invalid.join("; "))),
            (false, true) => None,
        };
        true
    }

    fn note_source_error(&mut self, e: Option<String>) {
        if e != self.source_error {
            if let Some(e) = &e {
                error!("time: reading the servers: {e}");
            }
            lock(&self.status).note = e.clone().map(|e| format!("cannot read the servers: {e}"));
            self.source_error = e;
        }
    }

    /// Ask the servers in turn and use the first good answer; returns how long to wait before
    /// the next poll.
    pub fn poll_once(&mut self) -> Duration {
        if self.servers.is_empty() {
            return POLL_MAX;
        }
        let started = Instant::now();
        let mut errors: Vec<String> = Vec::new();
        let n = self.servers.len();
        let mut earliest_hold: Option<Instant> = None;
        let mut tried = false;
        let start = self.preferred;
        for idx in (0..n).map(|i| (start + i) % n) {
            let spec = self.servers[idx].clone();
            if let Some((until, code)) = self.holds.get(&spec).cloned() {
                if Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now()).as_secs();
                    push(&mut errors, format!("{spec}: held off {left} s more after kiss-o'-death {code}"));
                    earliest_hold = Some(earliest_hold.map_or(until, |e| e.min(until)));
                    continue;
                }
                self.holds.remove(&spec);
            }
            if started.elapsed() >= ROUND_BUDGET {
                push(
                    &mut errors,
                    format!("{spec}: not asked (the poll's {} s were spent)", ROUND_BUDGET.as_secs()),
                );
                continue;
            }
            tried = true;
            let addrs = match spec.resolve() {
                Ok(a) if a.is_empty() => {
                    push(&mut errors, format!("{spec}: the name has no addresses"));
                    continue;
                }
                Ok(a) => a,
                Err(e) => {
                    push(&mut errors, format!("{spec}: cannot resolve: {e}"));
                    continue;
                }
            };
            for addr in addrs.into_iter().take(MAX_ADDRS) {
                if started.elapsed() >= ROUND_BUDGET {
                    break;
                }
                let clock = self.clock.clone();
                match sntp::query(addr, self.timeout, &move || clock.now_ns(), self.not_before_ns) {
                    Ok(sample) => {
                        self.preferred = idx;
                        return self.use_sample(&spec, addr, sample, errors);
                    }
                    Err(QueryError::Refused(r)) if r.kiss_code().is_some() => {
                        let at = shown(&spec, addr);
                        let code = r.kiss_code().unwrap_or_default();
                        let Some(h) = self.hold(&spec, &code) else {
                            push(&mut errors, format!("{at}: answer refused: {r}"));
                            continue;
                        };
                        warn!("time: {at} sent kiss-o'-death {code}; not asking it for {} s", h.as_secs());
                        push(&mut errors, format!("{at}: kiss-o'-death {code}; held off {} s", h.as_secs()));
                        break;
                    }
                    Err(e) => push(&mut errors, format!("{}: {e}", shown(&spec, addr))),
                }
            }
        }
        self.failures += 1;
        if self.failures.is_power_of_two() {
            warn!("time: no usable answer (poll {} without one): {}", self.failures, errors.join("; "));
        }
        self.record(false, errors);
        let backoff = self.backoff();
        match earliest_hold {
            // Every server is held off: wait for the first to be free again.
            Some(t) if !tried => t.saturating_duration_since(Instant::now()).clamp(FAIL_WAIT, POLL_MAX),
            _ => backoff,
        }
    }

    /// Hold `spec` off after kiss-o'-death `code` (RATE: twice the interval, DENY and RSTR: a
    /// day); None for codes that only refuse the one answer.
    fn hold(&mut self, spec: &ServerSpec, code: &str) -> Option<Duration> {
        let h = match code {
            "RATE" => (self.poll * 2).max(HOLD_RATE_MIN),
            "DENY" | "RSTR" => HOLD_DENY,
            _ => return None,
        };
        self.holds.insert(spec.clone(), (Instant::now() + h, code.to_string()));
        Some(h)
    }

    fn backoff(&self) -> Duration {
        FAIL_WAIT.saturating_mul(1 << (self.failures.max(1) - 1).min(16)).min(POLL_MAX)
    }

    fn record(&self, ok: bool, errors: Vec<String>) {
        lock(&self.status).last_attempt = Some(Attempt { at_ns: self.clock.now_ns(), ok, errors });
    }

    fn use_sample(
        &mut self,
        spec: &ServerSpec,
        addr: SocketAddr,
        s: Sample,
        mut errors: Vec<String>,
    ) -> Duration {
        let threshold = STEP_THRESHOLD.as_nanos() as i64;
        let big = s.offset_ns.abs() > threshold;
        let server = shown(spec, addr);
        let confirmed = self.first || self.pending_step.is_some_and(|p| (p - s.offset_ns).abs() <= threshold);
        if big && !confirmed {
            info!(
                "time: {server} says the clock is off by {:+.3} s; measuring again before stepping",
                secs_f(s.offset_ns)
            );
            self.pending_step = Some(s.offset_ns);
            lock(&self.status).pending_step_ns = Some(s.offset_ns);
            errors.push(format!(
                "{server}: offset {:+.3} s waits for a second sample to confirm a step",
                secs_f(s.offset_ns)
            ));
            self.record(true, errors);
            return CONFIRM_WAIT;
        }
        let est = s.delay_ns / 2;
        let result = if big {
            self.clock.step(s.offset_ns).and_then(|()| self.clock.slew(0, POLL_MIN, s.distance_ns, est))
        } else {
            self.clock.slew(s.offset_ns, self.poll, s.distance_ns + s.offset_ns.abs(), est)
        };
        if let Err(e) = result {
            error!("time: correcting the clock by {:+.3} s: {e}", secs_f(s.offset_ns));
            errors.push(format!("correcting the clock by {:+.3} s: {e}", secs_f(s.offset_ns)));
            self.failures += 1;
            self.record(false, errors);
            return self.backoff();
        }
        let was_first = self.first;
        self.first = false;
        self.pending_step = None;
        self.failures = 0;
        self.poll = if big || s.offset_ns.unsigned_abs() > POLL_SHRINK.as_nanos() as u64 {
            POLL_MIN
        } else if s.offset_ns.unsigned_abs() < POLL_GROW.as_nanos() as u64 {
            (self.poll * 2).min(POLL_MAX)
        } else {
            self.poll
        };
        let now = self.clock.now_ns();
        if big {
            info!(
                "time: stepped the clock by {:+.3} s to {} ({server}, stratum {})",
                secs_f(s.offset_ns),
                sntp::rfc3339(now),
                s.stratum
            );
        } else if was_first {
            info!(
                "time: synchronised with {server} (stratum {}, offset {:+.6} s, slewing)",
                s.stratum,
                secs_f(s.offset_ns)
            );
        }
        let mut st = lock(&self.status);
        if big {
            st.steps += 1;
            st.last_step = Some((now, s.offset_ns));
        }
        st.server = Some(server);
        st.stratum = Some(s.stratum);
        st.last_offset_ns = Some(s.offset_ns);
        st.last_delay_ns = Some(s.delay_ns);
        st.last_distance_ns = Some(s.distance_ns);
        st.last_sync = Some((now, Instant::now()));
        st.pending_step_ns = None;
        st.poll = self.poll;
        st.last_attempt = Some(Attempt { at_ns: now, ok: true, errors });
        self.poll
    }

    /// The thread: re-read the servers every [`SETTINGS_CHECK`], poll when it is time.
    fn run(mut self, source: ServerSource) -> ! {
        let mut next = Instant::now();
        loop {
            match source() {
                Ok(list) => {
                    self.note_source_error(None);
                    if self.set_servers(list) {
                        next = Instant::now();
                    }
                }
                Err(e) => self.note_source_error(Some(e)),
            }
            if Instant::now() >= next {
                // A panic in one poll must not end time keeping: it is logged, and retried.
                let wait = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_once()))
                    .unwrap_or_else(|_| {
                        error!("time: a poll panicked; trying again in {} s", POLL_MIN.as_secs());
                        POLL_MIN
                    });
                next = Instant::now() + wait;
                lock(&self.status).next_poll = Some(next);
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()).min(SETTINGS_CHECK));
        }
    }
}

/// A clock for tests: the real time plus a skew that steps and sets change; it records what
/// was asked of it and never touches the host's clock.
#[cfg(test)]
pub mod fake {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Event {
        Step(i64),
        Slew(i64),
        Set(Timestamp),
    }

    pub struct FakeClock {
        pub skew_ns: Mutex<i64>,
        pub sync: Mutex<Option<Duration>>,
        pub events: Mutex<Vec<Event>>,
    }

    impl FakeClock {
        pub fn new(skew_ns: i64, sync: Option<Duration>) -> Arc<FakeClock> {
            Arc::new(FakeClock {
                skew_ns: Mutex::new(skew_ns),
                sync: Mutex::new(sync),
                events: Mutex::new(Vec::new()),
            })
        }

        pub fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        pub fn skew(&self) -> i64 {
            *self.skew_ns.lock().unwrap()
        }
    }

    impl Clock for FakeClock {
        fn now_ns(&self) -> i64 {
            realtime_ns() + self.skew()
        }

        fn step(&self, offset_ns: i64) -> io::Result<()> {
            *self.skew_ns.lock().unwrap() += offset_ns;
            self.events.lock().unwrap().push(Event::Step(offset_ns));
            Ok(())
        }

        fn slew(&self, offset_ns: i64, _: Duration, max_error_ns: i64, _: i64) -> io::Result<()> {
            *self.sync.lock().unwrap() = Some(Duration::from_nanos(max_error_ns.max(0) as u64));
            self.events.lock().unwrap().push(Event::Slew(offset_ns));
            Ok(())
        }

        fn set(&self, t: Timestamp) -> io::Result<()> {
            *self.skew_ns.lock().unwrap() = t.as_nanosecond() as i64 - realtime_ns();
            self.events.lock().unwrap().push(Event::Set(t));
            Ok(())
        }

        fn sync_error(&self) -> Option<Duration> {
            *self.sync.lock().unwrap()
        }
    }
}
