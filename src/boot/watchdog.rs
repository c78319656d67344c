//! The hardware watchdog while a slot is on trial: stage 1 arms it, stage 2 feeds it until the
//! boot is healthy and then stops it. If PID 1 or the kernel hangs before that, the machine
//! resets, the slot's try is used up, and boot control takes the other slot.

use std::fs::{File, OpenOptions};
use std::io::Write;

use log::{info, warn};

pub const DEVICE: &str = "/dev/watchdog";
/// Seconds without feeding before the machine resets (`berth.watchdog-timeout` overrides).
pub const TIMEOUT: u64 = 60;

pub struct Watchdog(File);

impl Watchdog {
    /// Open (and so start) the watchdog, if the machine has one, with `timeout` seconds.
    pub fn arm(timeout: u64) -> Option<Watchdog> {
        match OpenOptions::new().write(true).open(DEVICE) {
            Ok(f) => {
                let t = crate::sys::watchdog_set_timeout(&f, timeout.min(3600) as i32).unwrap_or(0);
                info!("watchdog armed while on trial (timeout {t} s)");
                let mut w = Watchdog(f);
                w.feed();
                Some(w)
            }
            Err(e) => {
                warn!("no watchdog ({DEVICE}: {e}); a hung boot on trial will not be reset");
                None
            }
        }
    }

    pub fn feed(&mut self) {
        let _ = self.0.write_all(b"\0");
    }

    /// Stop the watchdog (the driver's magic close).
    pub fn disarm(mut self) {
        let _ = self.0.write_all(b"V");
        info!("watchdog stopped: the boot is healthy");
    }
}
