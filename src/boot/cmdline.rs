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
//!
//! **Init arguments.** Words after ` -- ` are not the kernel's: it hands them to PID 1 as its
//! arguments (`settings.boot.init-parameters` puts them there; see `settings::boot`). Berth
//! reads them from the same `/proc/cmdline` text (stage 1 and stage 2 alike, so nothing has to
//! be carried across the exec), and there only the keys in `settings::boot::INIT_KEYS` count:
//! they override the image's value of the same key; any other word there is ignored with a
//! warning, so an init argument can never name the slot, the root hash or the SELinux mode.

use std::collections::BTreeMap;

use log::warn;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    keys: BTreeMap<String, String>,
    /// The words after ` -- ` (arguments to init, `settings.boot.init-parameters`).
    init: Vec<String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut keys = BTreeMap::new();
        let words = split(text);
        let (kernel, init) = match words.iter().position(|w| w == "--") {
            Some(i) => (&words[..i], &words[i + 1..]),
            None => (&words[..], &[][..]),
        };
        for word in kernel {
            if let Some(rest) = word.strip_prefix("berth.") {
                let (k, v) = rest.split_once('=').unwrap_or((rest, "1"));
                keys.insert(k.to_string(), v.to_string());
            }
        }
        for word in init {
            let (k, v) = word.split_once('=').unwrap_or((word, "1"));
            match k.strip_prefix("berth.") {
                Some(key) if crate::settings::boot::INIT_KEYS.iter().any(|(known, _)| *known == k) => {
                    keys.insert(key.to_string(), v.to_string());
                }
                _ => warn!(
                    "init argument {word:?} ignored: not one Berth's init takes (settings::boot::INIT_KEYS)"
                ),
            }
        }
        Cmdline { keys, init: init.to_vec() }
    }

    /// The words after ` -- ` (for the log; [`Cmdline::get`] has the ones Berth took).
    pub fn init_arguments(&self) -> &[String] {
        &self.init
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
    fn init_arguments_after_the_separator_override_only_known_keys() {
        let c = Cmdline::parse(
            "console=ttyS0 berth.slot=A berth.health-timeout=300 -- berth.health-timeout=600 berth.slot=B \
             berth.selinux=permissive berth.rootwait=7 splash",
        );
        assert_eq!(c.get("health-timeout"), Some("600"), "an init argument overrides the image's");
        assert_eq!(c.get_u64("rootwait", 10), 7);
        assert_eq!(c.get("slot"), Some("A"), "berth.slot is not an init argument: ignored");
        assert_eq!(c.get("selinux"), None);
        assert_eq!(Cmdline::parse("a -- b c").init_arguments(), ["b", "c"]);
        assert!(Cmdline::parse("a b").init_arguments().is_empty());
    }

    #[test]
    fn bad_numbers_fall_back() {
        assert_eq!(Cmdline::parse("berth.rootwait=x").get_u64("rootwait", 7), 7);
    }
}
