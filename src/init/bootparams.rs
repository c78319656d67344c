//! `settings.boot` at boot (see `settings::boot` and docs/boot.md): say whether this node can
//! give its next boot a command line (before the datastore is opened, so that settings it
//! cannot honour are refused when committed, user data included), tell boot control where the
//! slots' BOOT partitions are, and, with `reboot-to-reconcile`, reboot once when this boot's
//! command line is not the one the settings ask for.
//!
//! The reconcile runs after the settings were applied (which wrote the entries or
//! `cmdline.txt`) and before the boot is marked good. It compares `/proc/cmdline` with the line
//! boot control now gives this slot's next boot: on UEFI the whole line, which Berth wrote
//! (normalised for spaces); on a Pi, whose firmware adds its own arguments, that every word of
//! the wanted line is there (so there a parameter removed waits for the next reboot). It
//! reboots at most once per wanted line: the line is recorded on PRIVATE before the reboot,
//! and a boot that finds it recorded and still differs only says so (a notice), so a firmware
//! that ignores the line can never cause a reboot loop. A boot on trial never reconciles: it
//! would use up the trial and roll the update back (its entry got the line when it was
//! activated anyway).

use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{Ctx, PRIVATE};
use crate::boot::{partitions, report, BootError};
use crate::bootctl::Slot;

/// Where the last reconcile reboot is recorded.
fn record_path() -> PathBuf {
    Path::new(PRIVATE).join("boot-reconcile.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    slot: Slot,
    /// The line the reboot was for.
    line: String,
}

/// Before the datastore opens: whether `settings.boot` can work on this node.
pub fn declare_support(ctx: &Ctx) {
    let support = crate::bootctl::boot_settings_support(&ctx.handoff.boot, ctx.handoff.secure_boot);
    if let Err(why) = &support {
        info!("settings.boot: {why}");
    }
    crate::settings::boot::set_node_support(support);
}

/// Once boot control's firmware backend is installed: where the slots' BOOT partitions are.
pub fn register_partitions(ctx: &Ctx) {
    if !matches!(ctx.handoff.boot.as_str(), "uefi" | "rpi") {
        return;
    }
    let disk = ctx.handoff.disk.file_name().map(|n| n.to_string_lossy().into_owned());
    let all = partitions::scan(Path::new("/sys/class/block"));
    let find = |slot: Slot| {
        all.iter()
            .find(|p| p.label == slot.label("BOOT") && disk.as_deref().is_none_or(|d| p.disk == d))
            .map(|p| p.path())
    };
    match (find(Slot::A), find(Slot::B)) {
        (Some(a), Some(b)) => {
            crate::bootctl::register_boot_partitions(&ctx.handoff.disk, ctx.handoff.sector_size, [a, b])
        }
        _ => report::notice(
            "settings.boot: the BOOT partitions were not found; the next boot's command line cannot be set",
        ),
    }
}

/// Whether `current` (this boot's /proc/cmdline) already is `want` (what boot control gives
/// this slot's next boot): the same words on UEFI, where Berth wrote the whole line; every
/// wanted word present where the firmware adds its own (`whole` false).
pub fn in_effect(current: &str, want: &str, whole: bool) -> bool {
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let (cur, want) = (words(current), words(want));
    if whole {
        cur == want
    } else {
        want.iter().all(|w| cur.contains(w))
    }
}

/// What to do at this boot: None (in effect, or not asked), or the reboot to make (Ok) or the
/// notice to give instead (Err).
fn decide(
    current: &str,
    want: &str,
    whole: bool,
    slot: Slot,
    recorded: Option<&Record>,
) -> Option<Result<Record, String>> {
    if in_effect(current, want, whole) {
        return None;
    }
    let record = Record { slot, line: want.to_string() };
    if recorded == Some(&record) {
        return Some(Err(format!(
            "settings.boot: this boot's command line is still not the one the settings ask for after \
             a reconcile reboot (wanted {want:?}); not rebooting again"
        )));
    }
    Some(Ok(record))
}

/// The phase: with `reboot-to-reconcile = true`, reboot once if this boot's command line is not
/// the settings' (module docs).
pub fn reconcile(ctx: &mut Ctx) -> Result<(), BootError> {
    let settings = ctx.store.as_ref().ok_or(BootError::Order { needs: "the datastore" })?.settings();
    if settings.boot.as_ref().and_then(|b| b.reboot_to_reconcile) != Some(true) {
        return Ok(());
    }
    let slot = ctx.handoff.slot;
    let Some(next) = crate::bootctl::next_cmdline(slot, true) else { return Ok(()) };
    let want = match next {
        Ok(Some(line)) => line,
        Ok(None) => return Ok(()),
        Err(e) => {
            report::notice(format!(
                "settings.boot: cannot tell what slot {slot}'s next boot gets ({e}); no reconcile"
            ));
            return Ok(());
        }
    };
    let current = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let recorded = std::fs::read(record_path()).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok());
    let whole = ctx.handoff.boot == "uefi";
    match decide(&current, &want, whole, slot, recorded.as_ref()) {
        None => Ok(()),
        Some(Err(notice)) => {
            report::notice(notice);
            Ok(())
        }
        Some(Ok(_)) if ctx.handoff.on_trial => {
            report::notice(
                "settings.boot: the command line differs, but this boot is on trial: no reconcile reboot \
                 (it would roll the update back); the settings take effect at the next reboot",
            );
            Ok(())
        }
        Some(Ok(record)) => {
            let bytes = serde_json::to_vec(&record).expect("record serializes");
            if let Err(e) = crate::settings::store::write_atomic(&record_path(), &bytes) {
                // Without the record a loop could not be ruled out: no reboot.
                warn!("settings.boot: recording the reconcile reboot: {e}; not rebooting");
                return Ok(());
            }
            warn!("settings.boot: reboot-to-reconcile: this boot's command line is not {want:?}; rebooting once");
            // Our signals are blocked and read by the event loop: the reboot is the orderly
            // one, as soon as the loop runs.
            crate::sys::kill(1, libc::SIGTERM)
                .map_err(BootError::io_on("signal", "PID 1 (reconcile reboot)".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_effect_on_uefi_and_on_a_pi() {
        assert!(in_effect("a b  c\n", "a b c", true));
        assert!(!in_effect("a b", "a b c", true), "a parameter added");
        assert!(!in_effect("a b c", "a b", true), "a parameter removed");
        assert!(in_effect("fw1 a b fw2 c", "a b c", false), "the Pi firmware adds its own");
        assert!(!in_effect("fw1 a b", "a b c", false));
    }

    #[test]
    fn at_most_one_reconcile_reboot_per_wanted_line() {
        let want = "a b nosmt";
        let first = decide("a b", want, true, Slot::A, None).unwrap().unwrap();
        assert_eq!(first, Record { slot: Slot::A, line: want.into() });
        // The reboot happened and the firmware still gave the old line: a notice, no loop.
        assert!(decide("a b", want, true, Slot::A, Some(&first)).unwrap().is_err());
        // The settings changed again: one more reboot is allowed, for the new line.
        assert!(decide("a b", "a b x", true, Slot::A, Some(&first)).unwrap().is_ok());
        // In effect: nothing to do, whatever the record.
        assert!(decide(want, want, true, Slot::A, Some(&first)).is_none());
        assert!(decide(want, want, true, Slot::A, None).is_none());
    }
}
