//! The hardware watchdog, for the life of the system: stage 1 arms it on every boot, stage 2
//! opens it again and PID 1's main loop feeds it on every turn (at least every 200 ms), also
//! while shutting down. If the kernel, stage 1, a boot phase or PID 1's main loop hangs — before
//! the boot is healthy or long after — the machine resets. Before the boot is marked good this
//! uses up the slot's try, so boot control falls back to the other slot; after, it is a reboot
//! of the same, known-good slot.
//!
//! Only the main thread feeds it, so a hang of any other thread does not count; those are
//! supervised separately (src/init/tasks.rs). `berth.watchdog=off` on the kernel command line
//! leaves it unarmed (debugging with a stopped kernel, machines whose watchdog misbehaves);
//! `berth.watchdog-timeout=SECS` sets the timeout (default [`TIMEOUT`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use log::{info, warn};

use super::cmdline::Cmdline;

pub const DEVICE: &str = "/dev/watchdog";
/// Seconds without feeding before the machine resets (`berth.watchdog-timeout` overrides).
pub const TIMEOUT: u64 = 60;

pub struct Watchdog(File);

/// Stage 2's watchdog, fed by [`feed`].
static ARMED: Mutex<Option<Watchdog>> = Mutex::new(None);

/// Open (and so start) the watchdog as the command line says; None when it is off or the
/// machine has none.
pub fn arm(cmdline: &Cmdline, on_trial: bool) -> Option<Watchdog> {
    if cmdline.get("watchdog") == Some("off") {
        warn!("watchdog off (berth.watchdog=off): a hang will not be reset");
        return None;
    }
    let timeout = cmdline.get_u64("watchdog-timeout", TIMEOUT).clamp(1, 3600);
    match OpenOptions::new().write(true).open(DEVICE) {
        Ok(f) => {
            let t = crate::sys::watchdog_set_timeout(&f, timeout as i32).unwrap_or(0);
            info!("watchdog armed (timeout {t} s{})", if on_trial { ", slot on trial" } else { "" });
            let mut w = Watchdog(f);
            w.feed();
            Some(w)
        }
        Err(e) => {
            warn!("no watchdog ({DEVICE}: {e}); a hang will not be reset");
            None
        }
    }
}

impl Watchdog {
    pub fn feed(&mut self) {
        let _ = self.0.write_all(b"\0");
    }
}

/// Keep `w` as the system's watchdog, fed by [`feed`] from now on.
pub fn install(w: Option<Watchdog>) {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = w;
}

/// Feed the system's watchdog, if one is armed. Called by PID 1's main thread only.
pub fn feed() {
    if let Some(w) = ARMED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        w.feed();
    }
}

/// Whether a watchdog is armed.
pub fn armed() -> bool {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}
