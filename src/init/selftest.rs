//! Self-tests that the QEMU tests switch on with `berth.selftest=NAME`; PID 1 runs them as
//! supervised services (see `init::services`) and they report on the console, so a test can
//! check PID 1 from outside.
//!
//! `crash` (run as the `crashloop` service by `berth.selftest=crashloop`): exits 1 at once.
//!
//! `logflood` (service `selftest-logflood`): writes one 64 MiB line without a newline, then 2 M
//! empty lines, then `logflood done`, and sleeps: PID 1's log capture must stay bounded (the
//! test reads PID 1's peak RSS from `GET /system/state`).
//!
//! `apiflood` (service `selftest-apiflood`): a hostile API client. It keeps
//! [`FLOOD_IDLE`] connections open without ever sending on them (reopening each one the server
//! closes), checks from inside that a fresh client still gets answers, sends
//! [`FLOOD_BODIES`] concurrent 1 MiB bodies, and opens pending transactions past the quota;
//! then it reports one line on the console and holds its idle connections for good, so the
//! test can check from outside that the API still answers (and PID 1's peak memory).
//!
//! `orphans`: a child forks N grandchildren and exits at once, so they are re-parented to
//! PID 1; they exit shortly after. The reporter then counts zombies in /proc: a PID 1 that
//! does not reap adopted orphans leaves N of them.

use std::fs;
use std::time::Duration;

use crate::sys;

const ORPHANS: usize = 5;

/// Zombies whose parent is PID 1: exited processes PID 1 has not reaped.
fn zombies_of_pid1() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(") ")?;
                    let mut f = rest.split(' ');
                    Some(f.next()? == "Z" && f.next()? == "1")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// `berth selftest NAME` (the child side). Returns the process exit code.
pub fn run(name: &str) -> i32 {
    match name {
        "orphans" => orphans(),
        "logflood" => logflood(),
        "apiflood" => apiflood(),
        "crash" => {
            eprintln!("berth selftest: crashing on purpose");
            1
        }
        other => {
            eprintln!("berth selftest: unknown test '{other}' (known: orphans, crash, logflood, apiflood)");
            2
        }
    }
}

fn orphans() -> i32 {
    // This process is single-threaded here, so fork is safe.
    match sys::fork() {
        Ok(0) => {
            for _ in 0..ORPHANS {
                if let Ok(0) = sys::fork() {
                    std::thread::sleep(Duration::from_millis(300));
                    sys::exit_now(0);
                }
            }
            sys::exit_now(0); // the grandchildren are orphans now
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("berth selftest orphans: fork: {e}");
            return 1;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let z = zombies_of_pid1();
    let line = format!("berth-selftest: orphans={ORPHANS} zombies={} {z:?}\n", z.len());
    let _ = fs::write("/dev/console", line);
    0
}

fn logflood() -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let chunk = vec![b'x'; 1 << 20];
    let newlines = vec![b'\n'; 1 << 20];
    let mut flood = || -> std::io::Result<()> {
        for _ in 0..64 {
            out.write_all(&chunk)?;
        }
        for _ in 0..2 {
            out.write_all(&newlines)?;
        }
        writeln!(out, "logflood done")?;
        out.flush()
    };
    if let Err(e) = flood() {
        eprintln!("berth selftest logflood: {e}");
        return 1;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Idle connections `apiflood` holds: more than the server's 32 slots.
const FLOOD_IDLE: usize = 64;
/// Concurrent 1 MiB bodies `apiflood` sends.
const FLOOD_BODIES: usize = 32;
/// Pending transactions `apiflood` tries to open: more than the datastore's quota.
const FLOOD_TRANSACTIONS: usize = crate::settings::store::MAX_PENDING + 16;

/// One request on a fresh connection to the API; its status, or the error as text.
fn api_call(method: &str, target: &str, body: &[u8]) -> Result<u16, String> {
    use crate::http::client::{Connection, Options, Request};
    let opts = Options { io_timeout: Duration::from_secs(60), ..Options::default() };
    let mut conn =
        Connection::unix(std::path::Path::new(crate::api::SOCKET), &opts).map_err(|e| e.to_string())?;
    let req =
        Request { method, target, host: "localhost", headers: &[("Content-Type", "application/json")], body };
    conn.exchange(&req, 1 << 20).map(|(head, _)| head.status).map_err(|e| e.to_string())
}

/// `(status or error, count)` pairs, sorted, for the report line.
fn tally(results: impl IntoIterator<Item = Result<u16, String>>) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for r in results {
        let key = match r {
            Ok(status) => status.to_string(),
            // The server may refuse a body before it has all of it and close: the sender's
            // write then fails. Other errors are named on the console.
            Err(e) if e.contains("Broken pipe") || e.contains("reset by peer") => "closed".to_string(),
            Err(e) => {
                let _ = fs::write("/dev/console", format!("berth-selftest: apiflood: {e}\n"));
                "error".to_string()
            }
        };
        *counts.entry(key).or_default() += 1;
    }
    counts.iter().map(|(k, n)| format!("{k}x{n}")).collect::<Vec<_>>().join(",")
}

fn apiflood() -> i32 {
    use std::os::unix::net::UnixStream;
    // The idle clients: each reconnects as soon as the server closes it, for as long as this
    // process lives.
    for _ in 0..FLOOD_IDLE {
        std::thread::spawn(|| loop {
            match UnixStream::connect(crate::api::SOCKET) {
                Ok(mut s) => {
                    let _ = std::io::Read::read(&mut s, &mut [0u8; 64]); // returns when closed
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let fresh = tally((0..5).map(|_| api_call("GET", "/settings", b"")));
    let body = {
        let mut b = br#"{"motd": ""#.to_vec();
        b.resize(b.len() + (1 << 20), b'x');
        b.extend_from_slice(br#""}"#);
        std::sync::Arc::new(b)
    };
    let senders: Vec<_> = (0..FLOOD_BODIES)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || api_call("PATCH", "/settings?tx=apiflood-big", &body))
        })
        .collect();
    let bodies = tally(senders.into_iter().map(|t| t.join().unwrap_or_else(|_| Err("panicked".into()))));
    let pending = tally(
        (0..FLOOD_TRANSACTIONS)
            .map(|i| api_call("PATCH", &format!("/settings?tx=apiflood-{i}"), br#"{"motd": "pending"}"#)),
    );
    let line = format!(
        "berth-selftest: apiflood idle={FLOOD_IDLE} fresh={fresh} bodies={bodies} pending={pending}\n"
    );
    let _ = fs::write("/dev/console", line);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
