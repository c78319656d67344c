//! The power button: ACPI's button (x86, and arm64 under UEFI as on Graviton) and gpio-keys
//! (arm64 `virt` with a device tree) all reach us as an evdev KEY_POWER press. A watcher thread
//! per input device turns it into SIGPWR for PID 1, so the event loop handles it like any other
//! power-off request.

use std::fs::File;
use std::io::Read;

use log::{info, warn};

use crate::sys;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: timeval (16), type (2), code (2), value (4).
const EVENT_SIZE: usize = 24;

/// Does `/sys/class/input/<ev>/device/capabilities/key` include KEY_POWER?
fn has_power_key(bitmap: &str) -> bool {
    // Space-separated hex words, most significant first, each `long` wide (64 bits here).
    let words: Vec<&str> = bitmap.split_whitespace().rev().collect();
    let (word, bit) = ((KEY_POWER / 64) as usize, KEY_POWER % 64);
    words.get(word).and_then(|w| u64::from_str_radix(w, 16).ok()).is_some_and(|w| w & (1 << bit) != 0)
}

fn watch(dev: String) {
    let path = format!("/dev/input/{dev}");
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return warn!("power button {path}: {e}"),
    };
    let mut ev = [0u8; EVENT_SIZE];
    while f.read_exact(&mut ev).is_ok() {
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            info!("power button pressed ({dev})");
            let _ = sys::kill(1, libc::SIGPWR);
        }
    }
}

/// Start a watcher for every input device that has a power key.
pub fn watch_power_button() {
    let Ok(entries) = std::fs::read_dir("/sys/class/input") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let caps = std::fs::read_to_string(e.path().join("device/capabilities/key")).unwrap_or_default();
        if !has_power_key(&caps) {
            continue;
        }
        let _ = std::thread::Builder::new()
            .name(format!("power-{name}"))
            .stack_size(64 * 1024)
            .spawn(move || watch(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_key_bitmap() {
        // An ACPI power button: only KEY_POWER (bit 116 = word 1, bit 52).
        assert!(has_power_key("10000000000000 0"));
        assert!(!has_power_key("0"));
        assert!(!has_power_key("4 0"));
        assert!(!has_power_key("garbage"));
    }
}
