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
        "crash" => {
            eprintln!("berth selftest: crashing on purpose");
            1
        }
        other => {
            eprintln!("berth selftest: unknown test '{other}' (known: orphans, crash, logflood)");
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
