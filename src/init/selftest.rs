//! Self-tests that the QEMU tests switch on with `berth.selftest=NAME`; PID 1 runs them as
//! supervised services (see `init::services`) and they report on the console, so a test can
//! check PID 1 from outside.
//!
//! `crash` (run as the `crashloop` service by `berth.selftest=crashloop`): exits 1 at once.
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
        "crash" => {
            eprintln!("berth selftest: crashing on purpose");
            1
        }
        other => {
            eprintln!("berth selftest: unknown test '{other}' (known: orphans, crash)");
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
