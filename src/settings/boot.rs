//! `settings.boot`: Bottlerocket's `kernel-parameters`, `init-parameters` and
//! `reboot-to-reconcile`, which give the next boot more kernel command-line arguments.
//!
//! The shape is Bottlerocket's: a map from a parameter's name to its list of values, each value
//! one `name=value` word on the command line, an empty list the bare `name`
//! (`"console" = ["tty0", "ttyS1,115200n8"]` is `console=tty0 console=ttyS1,115200n8`).
//! Kernel parameters follow the slot's own command line; init parameters go after ` -- `, which
//! the kernel hands to PID 1 as its arguments (`boot::cmdline`), so they are Berth's own init
//! keys ([`INIT_KEYS`]).
//!
//! Whether a node can give its next boot a command line depends on how it boots, which only
//! the running node knows ([`set_node_support`]; docs/boot.md): UEFI without Secure Boot
//! (the boot entries' optional data) and the Raspberry Pi (`cmdline.txt`) can; UEFI with Secure
//! Boot (the signed command line is the only one the stub takes) and direct kernel boot (whoever
//! starts the kernel gives the command line) cannot, and there the keys are refused when they
//! are committed, with that reason, never accepted and ignored.
//!
//! What is checked whatever the node (bounds from the kernel, reasons in docs/boot.md):
//! names and values are printable ASCII without spaces or quotes (the kernel splits words on
//! spaces and only quotes group them); Berth's own parameters ([`OWNED`]) and the ones that
//! undo the verified boot or its enforcement ([`WEAKENING`]) are refused; at most
//! [`MAX_WORDS`] words (the kernel panics when more than 32 unknown words reach init's argv or
//! environment) and [`MAX_EXTRA_BYTES`] bytes, so that the slot's own line (~130 bytes on
//! the x86_64 images) and these fit the kernel's 2048-byte command line (`COMMAND_LINE_SIZE`
//! on x86_64 and arm64), which is checked again with the real line when the entries are
//! written.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::model::{Invalid, Settings};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Boot {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_parameters: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_parameters: Option<BTreeMap<String, Vec<String>>>,
    /// Reboot once at boot when the command line this boot got is not the one the settings
    /// ask for (`init::bootparams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot_to_reconcile: Option<bool>,
}

/// The kernel's command line holds at most this many bytes on x86_64 and arm64
/// (`COMMAND_LINE_SIZE`), the terminating NUL included.
pub const COMMAND_LINE_SIZE: usize = 2048;
/// What settings may add: the rest is left to the slot's own line.
pub const MAX_EXTRA_BYTES: usize = 1024;
/// Kernel words at most: the kernel passes words it does not know to init (bare ones in argv,
/// `name=value` in the environment) and panics beyond 32 of either.
pub const MAX_WORDS: usize = 24;
/// Values per parameter at most.
pub const MAX_VALUES: usize = 8;

/// Parameters Berth's image or boot control sets; a second value would fight it.
pub const OWNED: &[(&str, &str)] = &[
    ("root", "Berth mounts its verified root itself"),
    ("init", "the initramfs's /init is Berth's stage 1"),
    ("rdinit", "the initramfs's /init is Berth's stage 1"),
    ("initrd", "the UKI carries its initramfs; systemd-stub would load another file"),
    ("panic", "the fallback after a failed boot depends on the image's panic=10"),
    ("dm_mod.create", "Berth sets up dm-verity itself"),
    ("dm_mod.waitfor", "Berth sets up dm-verity itself"),
];

/// Parameters that undo the verified boot or its enforcement: SELinux, lockdown, module
/// signatures, dm-verity's behaviour, the LSM list, EFI runtime services (which boot control
/// needs to switch slots). Names compare with `-` and `_` alike, as the kernel's do.
pub const WEAKENING: &[&str] = &[
    "selinux",
    "enforcing",
    "checkreqprot",
    "security",
    "lsm",
    "lockdown",
    "module.sig_enforce",
    "module_sig_enforce",
    "efi",
    "noefi",
    "initcall_blacklist",
    "dm_verity.*",
];

/// Berth init keys that `init-parameters` may set, each with the check of its value. The
/// others are the image's (`berth.slot`, `berth.verity.*`), debugging switches that lower
/// enforcement (`berth.selinux`) or the tests' (`berth.selftest`, `berth.fault`).
pub const INIT_KEYS: &[(&str, &str)] = &[
    ("berth.rootwait", "seconds, 1-600"),
    ("berth.disk", "a disk name such as vda or nvme0n1"),
    ("berth.health-timeout", "seconds, 30-3600"),
    ("berth.watchdog-timeout", "seconds, 10-600"),
];

fn init_value_ok(key: &str, v: &str) -> bool {
    let secs = |lo: u64, hi: u64| v.parse::<u64>().is_ok_and(|n| (lo..=hi).contains(&n));
    match key {
        "berth.rootwait" => secs(1, 600),
        "berth.disk" => {
            (1..=32).contains(&v.len()) && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        }
        "berth.health-timeout" => secs(30, 3600),
        "berth.watchdog-timeout" => secs(10, 600),
        _ => false,
    }
}

/// What the running node can do with `settings.boot`: Ok, or why not. Unset (dev mode, host
/// tools, unit tests): accepted, as on a node that can.
static NODE: OnceLock<Result<(), String>> = OnceLock::new();

/// Say, once, whether this node can give its next boot a command line (PID 1, before the
/// datastore is opened).
pub fn set_node_support(support: Result<(), String>) {
    let _ = NODE.set(support);
}

/// The node's refusal, if it has one.
pub fn node_refusal() -> Option<&'static str> {
    NODE.get().and_then(|r| r.as_ref().err()).map(String::as_str)
}

/// The name as the kernel compares it (`-` and `_` alike).
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn word_ok(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'`'))
}

fn name_ok(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// The words of a parameter map, in name order.
fn words(map: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, values) in map {
        if values.is_empty() {
            out.push(name.clone());
        }
        out.extend(values.iter().map(|v| format!("{name}={v}")));
    }
    out
}

impl Boot {
    /// The kernel words settings add, in name order.
    pub fn kernel_words(&self) -> Vec<String> {
        self.kernel_parameters.as_ref().map(words).unwrap_or_default()
    }

    /// The words for init (after ` -- `), in name order.
    pub fn init_words(&self) -> Vec<String> {
        self.init_parameters.as_ref().map(words).unwrap_or_default()
    }

    /// Whether these settings add anything to the command line.
    pub fn adds_anything(&self) -> bool {
        !self.kernel_words().is_empty() || !self.init_words().is_empty()
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { key: key.into(), message: message.into() }
}

fn check_map(group: &str, map: &BTreeMap<String, Vec<String>>) -> Result<(), Invalid> {
    for (name, values) in map {
        let key = format!("settings.boot.{group}.{name}");
        if !name_ok(name) {
            return Err(invalid(
                key,
                "a parameter name is 1-128 of [A-Za-z0-9_.-], starting with a letter or digit",
            ));
        }
        if values.len() > MAX_VALUES {
            return Err(invalid(key, format!("more than {MAX_VALUES} values")));
        }
        for v in values {
            if v.is_empty() || !word_ok(v) {
                return Err(invalid(
                    key,
                    format!("value {v:?} must be printable ASCII without spaces or quotes (one word on the command line)"),
                ));
            }
        }
    }
    Ok(())
}

fn check_kernel(map: &BTreeMap<String, Vec<String>>) -> Result<(), Invalid> {
    check_map("kernel-parameters", map)?;
    for name in map.keys() {
        let key = format!("settings.boot.kernel-parameters.{name}");
        let n = norm(name);
        if n.starts_with("berth.") {
            return Err(invalid(
                key,
                "Berth's own keys are init parameters: set them in settings.boot.init-parameters \
                 (those it lets settings change), the others belong to the image",
            ));
        }
        if let Some((_, why)) = OWNED.iter().find(|(o, _)| norm(o) == n) {
            return Err(invalid(key, format!("set by Berth's image, not by settings: {why}")));
        }
        let weakening = WEAKENING.iter().any(|w| match w.strip_suffix('*') {
            Some(p) => n.starts_with(&norm(p)),
            None => norm(w) == n,
        });
        if weakening {
            return Err(invalid(
                key,
                "refused: it would undo Berth's verified boot or its enforcement (SELinux, \
                 lockdown, module signatures, dm-verity, EFI boot control); build an image with \
                 it if you must (BERTH_CMDLINE_EXTRA, docs/boot.md)",
            ));
        }
    }
    Ok(())
}

fn check_init(map: &BTreeMap<String, Vec<String>>) -> Result<(), Invalid> {
    check_map("init-parameters", map)?;
    let known = || INIT_KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
    for (name, values) in map {
        let key = format!("settings.boot.init-parameters.{name}");
        let Some((_, what)) = INIT_KEYS.iter().find(|(k, _)| *k == name) else {
            return Err(invalid(
                key,
                format!(
                    "not an argument Berth's init takes from settings (init is Berth itself, not \
                     systemd); these are: {}",
                    known()
                ),
            ));
        };
        match values.as_slice() {
            [v] if init_value_ok(name, v) => {}
            _ => return Err(invalid(key, format!("one value: {what}"))),
        }
    }
    Ok(())
}

/// Check `settings.boot` (called from `Settings::validate`): the words, their bounds, and
/// whether this node can give its next boot a command line at all.
pub fn validate(settings: &Settings) -> Result<(), Invalid> {
    validate_on(settings, node_refusal())
}

/// [`validate`] on a node that refuses `settings.boot` for `refusal` (None: one that can).
fn validate_on(settings: &Settings, refusal: Option<&str>) -> Result<(), Invalid> {
    let Some(boot) = &settings.boot else { return Ok(()) };
    if let Some(k) = &boot.kernel_parameters {
        check_kernel(k)?;
    }
    if let Some(i) = &boot.init_parameters {
        check_init(i)?;
    }
    let (kw, iw) = (boot.kernel_words(), boot.init_words());
    if kw.len() > MAX_WORDS {
        return Err(invalid(
            "settings.boot.kernel-parameters",
            format!("{} words, more than {MAX_WORDS} (the kernel panics when too many reach init)", kw.len()),
        ));
    }
    let bytes = kw.iter().chain(&iw).map(|w| w.len() + 1).sum::<usize>() + if iw.is_empty() { 0 } else { 3 };
    if bytes > MAX_EXTRA_BYTES {
        return Err(invalid(
            "settings.boot",
            format!(
                "the parameters take {bytes} bytes of the command line, more than {MAX_EXTRA_BYTES} \
                 (the kernel's line holds {COMMAND_LINE_SIZE} with the slot's own)"
            ),
        ));
    }
    if let Some(why) = refusal {
        if boot.adds_anything() || boot.reboot_to_reconcile == Some(true) {
            return Err(invalid("settings.boot", why.to_string()));
        }
    }
    Ok(())
}

/// `base` (a slot's own command line) with `boot`'s words: kernel words after the base's
/// kernel words, init words after the base's own init arguments (behind ` -- `). Err when the
/// result does not fit the kernel's command line.
pub fn compose(base: &str, boot: &Boot) -> Result<String, String> {
    let base = base.trim();
    let (kernel, init) = match base.split_once(" -- ") {
        Some((k, i)) => (k.trim(), i.trim()),
        None => (base.strip_suffix(" --").unwrap_or(base), ""),
    };
    let mut line = kernel.to_string();
    for w in boot.kernel_words() {
        line.push(' ');
        line.push_str(&w);
    }
    let iw = boot.init_words();
    if !init.is_empty() || !iw.is_empty() {
        line.push_str(" --");
        for w in init.split_whitespace().map(str::to_string).chain(iw) {
            line.push(' ');
            line.push_str(&w);
        }
    }
    if line.len() + 1 > COMMAND_LINE_SIZE {
        return Err(format!(
            "the command line would be {} bytes, more than the kernel's {COMMAND_LINE_SIZE}",
            line.len() + 1
        ));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn boot(v: serde_json::Value) -> Result<Boot, Invalid> {
        let s = super::super::model::parse_for(&json!({ "boot": v }), None)?;
        Ok(s.boot.unwrap())
    }

    #[test]
    fn good_parameters_in_bottlerocket_shape() {
        let b = boot(json!({
            "kernel-parameters": {"console": ["tty0", "ttyS1,115200n8"], "crashkernel": ["2G-:256M"],
                                  "usbcore.quirks": ["0781:5580:bk"], "nosmt": []},
            "init-parameters": {"berth.health-timeout": ["600"]},
            "reboot-to-reconcile": true,
        }))
        .unwrap();
        assert_eq!(
            b.kernel_words(),
            [
                "console=tty0",
                "console=ttyS1,115200n8",
                "crashkernel=2G-:256M",
                "nosmt",
                "usbcore.quirks=0781:5580:bk"
            ]
        );
        assert_eq!(b.init_words(), ["berth.health-timeout=600"]);
        assert_eq!(
            compose("console=ttyS0 berth.slot=A\n", &b).unwrap(),
            "console=ttyS0 berth.slot=A console=tty0 console=ttyS1,115200n8 crashkernel=2G-:256M nosmt \
             usbcore.quirks=0781:5580:bk -- berth.health-timeout=600"
        );
        // The base's own init arguments stay, before the settings' ones.
        let k =
            boot(json!({"kernel-parameters": {"nosmt": []}, "init-parameters": {"berth.rootwait": ["5"]}}))
                .unwrap();
        assert_eq!(
            compose("a b -- berth.disk=vda", &k).unwrap(),
            "a b nosmt -- berth.disk=vda berth.rootwait=5"
        );
        assert_eq!(compose("a b", &Boot::default()).unwrap(), "a b");
    }

    #[test]
    fn bad_parameters_are_refused_with_the_reason() {
        let cases = [
            (json!({"kernel-parameters": {"selinux": ["0"]}}), "kernel-parameters.selinux", "undo"),
            (json!({"kernel-parameters": {"enforcing": ["0"]}}), "kernel-parameters.enforcing", "undo"),
            (json!({"kernel-parameters": {"lockdown": ["none"]}}), "kernel-parameters.lockdown", "undo"),
            (json!({"kernel-parameters": {"module.sig-enforce": ["0"]}}), "module.sig-enforce", "undo"),
            (json!({"kernel-parameters": {"dm-verity.error_behavior": ["0"]}}), "dm-verity", "undo"),
            (json!({"kernel-parameters": {"efi": ["noruntime"]}}), "kernel-parameters.efi", "EFI"),
            (json!({"kernel-parameters": {"root": ["/dev/sda"]}}), "kernel-parameters.root", "image"),
            (json!({"kernel-parameters": {"rdinit": ["/bin/sh"]}}), "rdinit", "stage 1"),
            (json!({"kernel-parameters": {"init": ["/bin/sh"]}}), "kernel-parameters.init", "stage 1"),
            (json!({"kernel-parameters": {"berth.slot": ["B"]}}), "berth.slot", "init-parameters"),
            (
                json!({"kernel-parameters": {"berth.verity.roothash": ["00"]}}),
                "berth.verity",
                "init-parameters",
            ),
            (json!({"kernel-parameters": {"console": ["a b"]}}), "console", "without spaces"),
            (json!({"kernel-parameters": {"console": ["\"x"]}}), "console", "quotes"),
            (json!({"kernel-parameters": {"console": [""]}}), "console", "printable"),
            (json!({"kernel-parameters": {"con sole": []}}), "con sole", "parameter name"),
            (json!({"kernel-parameters": {"--": []}}), "--", "parameter name"),
            (json!({"kernel-parameters": {"console": ["é"]}}), "console", "ASCII"),
            (
                json!({"kernel-parameters": {"x": ["1","2","3","4","5","6","7","8","9"]}}),
                "kernel-parameters.x",
                "values",
            ),
            (json!({"init-parameters": {"log_level": ["debug"]}}), "log_level", "berth.rootwait"),
            (
                json!({"init-parameters": {"berth.selinux": ["permissive"]}}),
                "berth.selinux",
                "not an argument",
            ),
            (json!({"init-parameters": {"berth.slot": ["B"]}}), "berth.slot", "not an argument"),
            (json!({"init-parameters": {"berth.health-timeout": ["5"]}}), "health-timeout", "30-3600"),
            (json!({"init-parameters": {"berth.health-timeout": []}}), "health-timeout", "one value"),
            (json!({"init-parameters": {"berth.disk": ["../sda"]}}), "berth.disk", "disk name"),
            (json!({"reboot-to-reconcile": "yes"}), "settings.boot.reboot-to-reconcile", "bool"),
            (json!({"kernel-parameter": {}}), "settings.boot", "unknown field"),
        ];
        for (v, key, needle) in cases {
            let e = boot(v.clone()).unwrap_err();
            assert!(e.key.contains(key), "{v}: {e}");
            assert!(e.message.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn bounds_on_words_and_bytes() {
        let many: serde_json::Map<String, serde_json::Value> =
            (0..MAX_WORDS + 1).map(|i| (format!("p{i}"), json!([]))).collect();
        let e = boot(json!({"kernel-parameters": many})).unwrap_err();
        assert!(e.message.contains("more than 24"), "{e}");
        let long: serde_json::Map<String, serde_json::Value> =
            (0..4).map(|i| (format!("p{i}"), json!(["x".repeat(300)]))).collect();
        let e = boot(json!({"kernel-parameters": long})).unwrap_err();
        assert!(e.message.contains("more than 1024"), "{e}");
        let b = boot(json!({"kernel-parameters": {"p": ["x".repeat(900)]}})).unwrap();
        assert!(compose(&"y".repeat(1200), &b).unwrap_err().contains("2048"));
    }

    #[test]
    fn a_node_that_cannot_set_the_command_line_refuses_with_its_reason() {
        let why = crate::bootctl::boot_settings_support("uefi", true).unwrap_err();
        assert!(why.contains("Secure Boot") && why.contains("BERTH_CMDLINE_EXTRA"), "{why}");
        let direct = crate::bootctl::boot_settings_support("direct", false).unwrap_err();
        assert!(direct.contains("-append"), "{direct}");
        assert!(crate::bootctl::boot_settings_support("uefi", false).is_ok());
        assert!(crate::bootctl::boot_settings_support("rpi", false).is_ok());
        let s = |v| super::super::model::parse_for(&json!({ "boot": v }), None).unwrap();
        let e = validate_on(&s(json!({"kernel-parameters": {"nosmt": []}})), Some(&why)).unwrap_err();
        assert_eq!((e.key.as_str(), e.message.as_str()), ("settings.boot", why.as_str()));
        assert!(validate_on(&s(json!({"reboot-to-reconcile": true})), Some(&why)).is_err());
        // Nothing asked of the command line: nothing to refuse.
        assert!(validate_on(&s(json!({"reboot-to-reconcile": false, "kernel-parameters": {}})), Some(&why))
            .is_ok());
        assert!(validate_on(&s(json!({"kernel-parameters": {"nosmt": []}})), None).is_ok());
    }
}
