//! The kernel command line's `berth.*` keys.
//!
//! | key | meaning |
//! |---|---|
//! | `berth.slot=A\|B` | boot this slot whatever boot control says (recovery, tests) |
//! | `berth.disk=vda` | only look for Berth's partitions on this disk |
//! | `berth.rootwait=SECS` | how long to wait for the disk to appear (default 10) |
//! | `berth.verity.roothash=HEX` | the slot's root hash, used instead of `slot.toml`'s (a UKI's signed command line carries it) |
//! | `berth.selinux=permissive` | SELinux permissive, and a policy that does not load is not fatal (debugging; `boot::selinux`) |
//! | `berth.health-timeout=SECS` | a slot on trial not healthy by then reboots (default 300) |
//! | `berth.selftest=orphans\|crashloop\|logflood\|apiflood` | run a self-test service (QEMU tests) |
//! | `berth.watchdog=off` | leave the hardware watchdog unarmed (it is armed on every boot) |
//! | `berth.watchdog-timeout=SECS` | the watchdog's timeout (default 60) |
//! | `berth.fault=hang-on-trial\|hang-after-ready` | fault injection for the watchdog tests: PID 1's main loop stops |

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    keys: BTreeMap<String, String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut keys = BTreeMap::new();
        for word in split(text) {
            if let Some(rest) = word.strip_prefix("berth.") {
                let (k, v) = rest.split_once('=').unwrap_or((rest, "1"));
                keys.insert(k.to_string(), v.to_string());
            }
        }
        Cmdline { keys }
    }

    pub fn read() -> Cmdline {
        Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(String::as_str)
    }

    pub fn get_u64(&self, key: &str, default: u64) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}

/// Split on spaces outside double quotes (the kernel's own rule), dropping the quotes.
fn split(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.trim().chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_berth_keys_only() {
        let c = Cmdline::parse(
            "console=ttyS0 berth.slot=B berth.rootwait=3 berth.flag \"berth.hostname=a b\" quiet\n",
        );
        assert_eq!(c.get("slot"), Some("B"));
        assert_eq!(c.get_u64("rootwait", 10), 3);
        assert_eq!(c.get("flag"), Some("1"));
        assert_eq!(c.get("hostname"), Some("a b"));
        assert_eq!(c.get("console"), None);
        assert_eq!(c.get_u64("missing", 10), 10);
    }

    #[test]
    fn bad_numbers_fall_back() {
        assert_eq!(Cmdline::parse("berth.rootwait=x").get_u64("rootwait", 7), 7);
    }
}
