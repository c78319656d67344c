//! Raspberry Pi 4 boot control: the firmware's `autoboot.txt` and its one-shot `tryboot`.
//!
//! The Pi 4's EEPROM bootloader reads `autoboot.txt` from the disk's first partition (here the
//! small FAT partition `BERTH-AUTOBOOT`, outside both slots) and starts the firmware, kernel,
//! device tree and initramfs from the FAT partition its `boot_partition` names: `[all]`
//! normally, `[tryboot]` when the reboot flag is set. The flag is set by the kernel when the
//! restart argument contains `tryboot` (Berth's kernel patch, `kernel/patches/`) and cleared
//! by the firmware before it boots, so a trial is one attempt by construction: any crash,
//! watchdog reset or power cut after it boots the `[all]` partition again.
//!
//! The GPT bits stay the record (see [`super`]); after every transaction [`RpiFirmware::apply`]
//! makes `autoboot.txt` say what the record means ([`Autoboot::for_slots`]):
//!
//! - `[all] boot_partition` is the known-good slot's BOOT partition (bootable and successful,
//!   highest priority, A on a tie);
//! - `[tryboot] boot_partition` is the slot on trial when the record's choice is one (bootable,
//!   not successful), else the known-good one too, so a stray `tryboot` changes nothing;
//! - a restart is a `tryboot` restart ([`tryboot_pending`]) exactly when the record's choice
//!   is a slot on trial.
//!
//! The file is rewritten only when its contents change (SD cards wear), atomically: the new
//! text goes to a temporary file that is fsynced, renamed over `autoboot.txt`, and the
//! directory fsynced ([`crate::settings::store::write_atomic`]). A power cut leaves the old
//! file or the new one (plus, at worst, a stale temporary file the firmware never reads and
//! the next write replaces), and stage 1 applies the record again at every boot, so a
//! transaction cut between the GPT and `autoboot.txt` is finished then.
//!
//! **The next boot's command line.** The firmware hands the kernel the `cmdline.txt` of the
//! partition it boots (one line; no signature on a Pi). With `settings.boot` parameters, each
//! bootable slot's `cmdline.txt` becomes the image's own line followed by them
//! ([`write_cmdline`]; `settings::boot::compose`). The image's line is kept beside it as
//! `cmdline.base.txt` the first time, so it is never lost or doubled; a slot the updater wrote
//! has a fresh `cmdline.txt` (and no `cmdline.base.txt`), which is taken as its base when the
//! slot is activated. Both files are written atomically as `autoboot.txt` is, the base first:
//! a power cut leaves the old `cmdline.txt` or the new one. Stage 1, which does not read
//! settings, leaves `cmdline.txt` as it is.
//!
//! Stage 1 learns what the firmware did from the device tree it was handed:
//! `/chosen/bootloader/partition` (the partition it booted) and `/chosen/bootloader/tryboot`
//! ([`Bootloader::read`]). The slot that runs is the one whose BOOT partition that is.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Slot, SlotState, Slots};

/// The label of the partition that holds `autoboot.txt` (and `user-data.toml`).
pub const LABEL: &str = "BERTH-AUTOBOOT";
/// The file the EEPROM reads from the first partition; at most 512 bytes.
pub const AUTOBOOT: &str = "autoboot.txt";
const AUTOBOOT_MAX: usize = 512;
/// Where the firmware reports how it booted.
pub const BOOTLOADER_DT: &str = "/proc/device-tree/chosen/bootloader";
/// The restart argument that makes the kernel set the firmware's tryboot flag.
pub const TRYBOOT_ARG: &str = "0 tryboot";
/// Where stage 1 and 2 mount `BERTH-AUTOBOOT` while they rewrite `autoboot.txt` (and a slot's
/// BOOT partition while its `cmdline.txt` is rewritten; boot control's lock makes it one at a
/// time).
pub const MOUNT: &str = "/run/berth/autoboot";
/// The kernel command line the firmware gives the kernel, on each slot's BOOT partition.
pub const CMDLINE: &str = "cmdline.txt";
/// The image's own `cmdline.txt`, kept the first time settings add to it.
pub const CMDLINE_BASE: &str = "cmdline.base.txt";
/// A `cmdline.txt` is one line; the kernel takes at most 2048 bytes of it.
const CMDLINE_MAX: u64 = 4096;

#[derive(Debug)]
pub enum Error {
    Io(PathBuf, io::Error),
    /// A file the firmware wrote or reads does not say what it must.
    Invalid(PathBuf, String),
    Mount(PathBuf, io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(p, e) => write!(f, "{}: {e}", p.display()),
            Error::Invalid(p, why) => write!(f, "{}: {why}", p.display()),
            Error::Mount(p, e) => write!(f, "mounting {} at {MOUNT}: {e}", p.display()),
        }
    }
}

impl std::error::Error for Error {}

/// What `autoboot.txt` says: the partition the firmware boots normally, and on a tryboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    pub default: u32,
    pub tryboot: u32,
}

impl Autoboot {
    /// What the record `slots` means for the firmware; `boot` holds the partition numbers of
    /// BERTH-BOOT-A and BERTH-BOOT-B.
    pub fn for_slots(slots: Slots, boot: [u32; 2]) -> Autoboot {
        let number = |slot: Slot| if slot == Slot::A { boot[0] } else { boot[1] };
        let good = known_good(slots);
        let trial = super::choose(slots.a, slots.b).filter(|s| !slots[*s].successful);
        // With no known-good slot (a record nobody should write), the firmware boots what the
        // record would choose, or A.
        let default = good.or(trial).unwrap_or(Slot::A);
        Autoboot { default: number(default), tryboot: number(trial.unwrap_or(default)) }
    }

    pub fn render(&self) -> String {
        format!(
            "# Written by Berth's boot control (docs/raspberry-pi.md): do not edit.\n\
             [all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            self.default, self.tryboot
        )
    }

    /// Read `text` as the firmware does: `[all]` entries, and in tryboot mode those of
    /// `[tryboot]` on top. Returns the partition each mode boots.
    pub fn parse(text: &str) -> Result<Autoboot, String> {
        if text.len() > AUTOBOOT_MAX {
            return Err(format!("{} bytes, more than the firmware reads ({AUTOBOOT_MAX})", text.len()));
        }
        let (mut section, mut all, mut tryboot, mut a_b) = ("all", None, None, false);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = match name {
                    "all" => "all",
                    "tryboot" => "tryboot",
                    _ => "other",
                };
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("'{line}' is not key=value"));
            };
            match (section, key.trim()) {
                ("all", "boot_partition") => all = Some(value.trim()),
                ("tryboot", "boot_partition") => tryboot = Some(value.trim()),
                ("all", "tryboot_a_b") => a_b = value.trim() == "1",
                _ => {}
            }
        }
        let num = |v: &str| v.parse::<u32>().map_err(|_| format!("boot_partition={v} is not a number"));
        let default = num(all.ok_or("no boot_partition in [all]")?)?;
        if !a_b {
            return Err("no tryboot_a_b=1 in [all]".into());
        }
        let tryboot = tryboot.map(num).transpose()?.unwrap_or(default);
        Ok(Autoboot { default, tryboot })
    }
}

/// The bootable, successful slot with the highest priority (A on a tie).
fn known_good(slots: Slots) -> Option<Slot> {
    let good = |s: SlotState| s.bootable() && s.successful;
    match (good(slots.a), good(slots.b)) {
        (true, true) if slots.b.priority > slots.a.priority => Some(Slot::B),
        (true, _) => Some(Slot::A),
        (false, true) => Some(Slot::B),
        (false, false) => None,
    }
}

/// Whether a restart must ask the firmware for its `[tryboot]` partition: the record chooses
/// a slot on trial.
pub fn tryboot_pending(slots: Slots) -> bool {
    super::choose(slots.a, slots.b).is_some_and(|s| !slots[s].successful)
}

/// How the firmware booted, from `/chosen/bootloader` in the device tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootloader {
    pub partition: u32,
    pub tryboot: bool,
}

impl Bootloader {
    /// `dir` is the `chosen/bootloader` node; None when there is none (not started by the Pi
    /// firmware).
    pub fn read(dir: &Path) -> Result<Option<Bootloader>, Error> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let cell = |name: &str| -> Result<u32, Error> {
            let path = dir.join(name);
            let bytes = fs::read(&path).map_err(|e| Error::Io(path.clone(), e))?;
            // A device-tree integer: one big-endian 32-bit cell.
            let cell: [u8; 4] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| Error::Invalid(path, format!("{} bytes, not one 32-bit cell", bytes.len())))?;
            Ok(u32::from_be_bytes(cell))
        };
        let tryboot = match cell("tryboot") {
            Ok(v) => v != 0,
            // Firmware too old to know tryboot reports none: it never tries.
            Err(Error::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        Ok(Some(Bootloader { partition: cell("partition")?, tryboot }))
    }

    /// The slot whose BOOT partition (numbers in `boot`) the firmware started.
    pub fn slot(&self, boot: [u32; 2]) -> Option<Slot> {
        [Slot::A, Slot::B].into_iter().zip(boot).find(|(_, n)| *n == self.partition).map(|(s, _)| s)
    }
}

/// Where `autoboot.txt` is: a directory (the unit tests'), or the `BERTH-AUTOBOOT` partition,
/// mounted at [`MOUNT`] for the time of one read or write.
#[derive(Debug, Clone)]
pub enum Location {
    #[cfg_attr(not(test), allow(dead_code))]
    Dir(PathBuf),
    Partition(PathBuf),
}

/// What each slot's `cmdline.txt` should say (stage 2, from `settings.boot`).
#[derive(Debug, Clone)]
pub struct NextCmdline {
    pub boot: crate::settings::boot::Boot,
    /// BERTH-BOOT-A and BERTH-BOOT-B.
    pub parts: [Location; 2],
}

/// The Raspberry Pi firmware, as boot control tells it.
#[derive(Debug, Clone)]
pub struct RpiFirmware {
    pub at: Location,
    /// Partition numbers of BERTH-BOOT-A and BERTH-BOOT-B.
    pub boot: [u32; 2],
    /// The slots' command lines; None leaves `cmdline.txt` as it is (stage 1).
    pub next_cmdline: Option<NextCmdline>,
}

fn read_small(path: &Path) -> Result<String, Error> {
    let len = fs::metadata(path).map_err(|e| Error::Io(path.to_path_buf(), e))?.len();
    if len > CMDLINE_MAX {
        return Err(Error::Invalid(path.to_path_buf(), format!("{len} bytes, not one command line")));
    }
    fs::read_to_string(path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    crate::settings::store::write_atomic(path, text.as_bytes()).map_err(|e| match e {
        crate::settings::store::Error::Io { path, error } => Error::Io(path, error),
        other => Error::Invalid(path.to_path_buf(), other.to_string()),
    })
}

/// Make `dir`'s `cmdline.txt` the image's line with `boot`'s parameters (see the module docs).
/// Returns whether it was rewritten.
pub fn write_cmdline(dir: &Path, boot: &crate::settings::boot::Boot) -> Result<bool, Error> {
    let (path, base_path) = (dir.join(CMDLINE), dir.join(CMDLINE_BASE));
    let now = read_small(&path)?;
    let base = match read_small(&base_path) {
        Ok(b) => b,
        Err(Error::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => {
            if !boot.adds_anything() {
                return Ok(false);
            }
            // The base first: cut after it, cmdline.txt is still the image's line.
            write(&base_path, &now)?;
            now.clone()
        }
        Err(e) => return Err(e),
    };
    let want = if boot.adds_anything() {
        let line = crate::settings::boot::compose(base.lines().next().unwrap_or(""), boot)
            .map_err(|why| Error::Invalid(path.clone(), why))?;
        format!("{line}\n")
    } else {
        base
    };
    if now == want {
        return Ok(false);
    }
    write(&path, &want)?;
    Ok(true)
}

/// Run `f` in `at`'s directory: a directory as it is, a FAT partition mounted at [`MOUNT`] for
/// the time `f` runs (read-only unless `write`).
fn with_location<T>(
    at: &Location,
    write: bool,
    f: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    match at {
        Location::Dir(dir) => f(dir),
        Location::Partition(dev) => {
            let dir = Path::new(MOUNT);
            fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
            let flags = crate::sys::MS_NOSUID
                | crate::sys::MS_NODEV
                | crate::sys::MS_NOEXEC
                | if write { 0 } else { crate::sys::MS_RDONLY };
            crate::sys::mount(Some(&dev.to_string_lossy()), dir, Some("vfat"), flags, None)
                .map_err(|e| Error::Mount(dev.clone(), e))?;
            let r = f(dir);
            // Unmounting writes back whatever FAT metadata is still cached.
            let unmounted = crate::sys::umount(dir, 0).map_err(|e| Error::Io(dir.to_path_buf(), e));
            let r = r?;
            unmounted?;
            Ok(r)
        }
    }
}

impl RpiFirmware {
    fn with_dir<T>(&self, write: bool, f: impl FnOnce(&Path) -> Result<T, Error>) -> Result<T, Error> {
        with_location(&self.at, write, f)
    }

    /// Each bootable slot's `cmdline.txt` as `next_cmdline` says (nothing without it). A slot
    /// that cannot boot is left alone: it is written when it is activated.
    fn apply_cmdlines(&self, slots: Slots) -> Result<bool, Error> {
        let Some(next) = &self.next_cmdline else { return Ok(false) };
        let mut wrote = false;
        for (slot, at) in [Slot::A, Slot::B].into_iter().zip(&next.parts) {
            if slots[slot].bootable() {
                wrote |= with_location(at, true, |dir| write_cmdline(dir, &next.boot))?;
            }
        }
        Ok(wrote)
    }

    /// The `cmdline.txt` of each slot, as the firmware will read it.
    pub fn cmdlines(&self) -> Option<[Result<String, String>; 2]> {
        let next = self.next_cmdline.as_ref()?;
        Some([0, 1].map(|i| {
            with_location(&next.parts[i], false, |dir| read_small(&dir.join(CMDLINE)))
                .map(|t| t.trim_end().to_string())
                .map_err(|e| e.to_string())
        }))
    }

    /// What `autoboot.txt` says now.
    pub fn read(&self) -> Result<Autoboot, Error> {
        self.with_dir(false, |dir| {
            let path = dir.join(AUTOBOOT);
            let text = fs::read_to_string(&path).map_err(|e| Error::Io(path.clone(), e))?;
            Autoboot::parse(&text).map_err(|why| Error::Invalid(path, why))
        })
    }

    /// Make the slots' `cmdline.txt` and `autoboot.txt` say what `slots` means. Returns whether
    /// anything was rewritten.
    pub fn apply(&self, slots: Slots) -> Result<bool, Error> {
        let cmdlines = self.apply_cmdlines(slots)?;
        let want = Autoboot::for_slots(slots, self.boot).render();
        self.with_dir(true, |dir| {
            let path = dir.join(AUTOBOOT);
            if fs::read_to_string(&path).is_ok_and(|now| now == want) {
                return Ok(cmdlines);
            }
            write(&path, &want)?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootctl::{BootControl, Error as BcError};
    use crate::testing::TempDir;

    const BOOT: [u32; 2] = [2, 5];

    fn st(priority: u8, tries: u8, successful: bool) -> SlotState {
        SlotState { priority, tries, successful }
    }

    /// The record and the firmware it tells, as boot control keeps them in PID 1: the record
    /// changes first, then `autoboot.txt`.
    struct Pi {
        slots: Slots,
        fw: RpiFirmware,
        dir: TempDir,
    }

    impl BootControl for Pi {
        fn states(&mut self) -> Result<Slots, BcError> {
            Ok(self.slots)
        }
        fn modify<R, E: From<BcError>>(
            &mut self,
            change: impl FnOnce(&mut Slots) -> Result<R, E>,
        ) -> Result<R, E> {
            let mut s = self.slots;
            let r = change(&mut s)?;
            if s != self.slots {
                self.slots = s;
                self.fw.apply(s).map_err(BcError::Rpi)?;
            }
            Ok(r)
        }
    }

    fn pi(name: &str, a: SlotState, b: SlotState) -> Pi {
        let dir = TempDir::new(name);
        let fw = RpiFirmware { at: Location::Dir(dir.path().to_path_buf()), boot: BOOT, next_cmdline: None };
        let slots = Slots { a, b };
        fw.apply(slots).unwrap();
        Pi { slots, fw, dir }
    }

    impl Pi {
        fn text(&self) -> String {
            fs::read_to_string(self.dir.path().join(AUTOBOOT)).unwrap()
        }
        /// What the firmware boots after a restart (with or without the tryboot flag).
        fn firmware_boots(&self, tryboot: bool) -> u32 {
            let a = Autoboot::parse(&self.text()).unwrap();
            if tryboot {
                a.tryboot
            } else {
                a.default
            }
        }
        /// One boot: the firmware picks the partition, stage 1 uses up a try.
        fn boot(&mut self, tryboot: bool) -> (Slot, bool) {
            let bl = Bootloader { partition: self.firmware_boots(tryboot), tryboot };
            let slot = bl.slot(BOOT).unwrap();
            let attempt = self.begin_boot(Some(slot)).unwrap();
            (attempt.slot, attempt.on_trial)
        }
    }

    #[test]
    fn autoboot_text_round_trips_and_fits() {
        let a = Autoboot { default: 2, tryboot: 5 };
        let text = a.render();
        assert!(text.len() <= AUTOBOOT_MAX);
        assert_eq!(Autoboot::parse(&text), Ok(a));
        assert!(text.contains("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=5\n"));
        for (bad, why) in [
            ("[all]\nboot_partition=2\n", "tryboot_a_b"),
            ("[all]\ntryboot_a_b=1\n", "no boot_partition"),
            ("[all]\ntryboot_a_b=1\nboot_partition=x\n", "not a number"),
            ("[all]\nnonsense\n", "key=value"),
        ] {
            assert!(Autoboot::parse(bad).unwrap_err().contains(why), "{bad}");
        }
        assert!(Autoboot::parse(&"#".repeat(600)).unwrap_err().contains("512"));
        // [tryboot] absent: the tryboot flag boots the default.
        assert_eq!(
            Autoboot::parse("[all]\ntryboot_a_b=1\nboot_partition=5\n"),
            Ok(Autoboot { default: 5, tryboot: 5 })
        );
    }

    #[test]
    fn what_the_record_tells_the_firmware() {
        let good = |p| st(p, 0, true);
        let trial = |p, t| st(p, t, false);
        let empty = st(0, 0, false);
        let cases = [
            (good(1), empty, (2, 2), false, "fresh image: A, a stray tryboot too"),
            (good(1), trial(2, 1), (2, 5), true, "update on trial: tryboot B once"),
            (good(1), trial(2, 0), (2, 2), false, "trial used up: A"),
            (good(1), good(2), (5, 5), false, "B committed"),
            (trial(2, 1), good(1), (5, 2), true, "update of A on trial from B"),
            (good(1), good(1), (2, 2), false, "tie goes to A"),
            (trial(1, 0), trial(1, 0), (2, 2), false, "nothing bootable: A"),
        ];
        for (a, b, (default, tryboot), pending, what) in cases {
            let slots = Slots { a, b };
            assert_eq!(Autoboot::for_slots(slots, BOOT), Autoboot { default, tryboot }, "{what}");
            assert_eq!(tryboot_pending(slots), pending, "{what}");
        }
    }

    #[test]
    fn update_tried_then_committed() {
        let mut pi = pi("rpi-commit", st(1, 0, true), st(0, 0, false));
        assert_eq!(pi.boot(false), (Slot::A, false));
        // The updater activates B: priority above A, one try.
        pi.set_state(Slot::B, st(2, 1, false)).unwrap();
        assert!(tryboot_pending(pi.slots));
        assert_eq!(pi.firmware_boots(false), 2, "A stays the default until B is good");
        assert_eq!(pi.boot(true), (Slot::B, true));
        assert_eq!(pi.slots.b, st(2, 0, false));
        assert!(!tryboot_pending(pi.slots), "no second try");
        // Healthy: B is committed, the firmware boots it without tryboot from now on.
        assert!(pi.mark_successful(Slot::B).unwrap());
        assert_eq!(Autoboot::parse(&pi.text()), Ok(Autoboot { default: 5, tryboot: 5 }));
        assert_eq!(pi.boot(false), (Slot::B, false));
    }

    #[test]
    fn failed_trial_falls_back_without_userspace() {
        let mut pi = pi("rpi-fallback", st(1, 0, true), st(0, 0, false));
        pi.set_state(Slot::B, st(2, 1, false)).unwrap();
        assert_eq!(pi.boot(true), (Slot::B, true));
        // Using up the try took B out of [tryboot] already.
        let before = pi.text();
        assert_eq!(Autoboot::parse(&before), Ok(Autoboot { default: 2, tryboot: 2 }));
        // B hangs or crashes: the watchdog or a power cut restarts without the flag, which
        // the firmware cleared when it started B.
        assert_eq!(pi.boot(false), (Slot::A, false));
        assert_eq!(pi.text(), before, "the fallback itself wrote nothing");
        // B failed by rebooting (a fatal error): the restart argument has no tryboot either.
        assert!(!tryboot_pending(pi.slots));
        // The updater deactivates B: autoboot.txt no longer names it.
        pi.set_state(Slot::B, st(0, 0, false)).unwrap();
        assert_eq!(Autoboot::parse(&pi.text()), Ok(Autoboot { default: 2, tryboot: 2 }));
    }

    #[test]
    fn a_trial_started_again_by_hand_is_refused_by_the_record() {
        let mut pi = pi("rpi-again", st(1, 0, true), st(2, 1, false));
        pi.boot(true);
        // Someone restarts with "0 tryboot" by hand while autoboot.txt still named B (a cut
        // before the record reached it): the record says B has no tries left.
        let bl = Bootloader { partition: 5, tryboot: true };
        let slot = bl.slot(BOOT).unwrap();
        assert!(!pi.slots[slot].bootable());
        // Stage 1 tells the firmware and restarts into A (see boot::choose_slot).
        assert!(!pi.fw.apply(pi.slots).unwrap(), "autoboot.txt already names A only");
        assert_eq!(Autoboot::parse(&pi.text()), Ok(Autoboot { default: 2, tryboot: 2 }));
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let pi = pi("rpi-nowrite", st(1, 0, true), st(0, 0, false));
        let path = pi.dir.path().join(AUTOBOOT);
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!pi.fw.apply(pi.slots).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    }

    /// A power cut while `autoboot.txt` is rewritten (committing B) leaves one of the states
    /// below: the temporary file written in part or whole and not yet renamed, or renamed. In
    /// each, the firmware reads a whole file that is the old one or the new one, and the next
    /// boot's stage 1 (which applies the record again) ends with the new file and no debris.
    #[test]
    fn power_cut_while_autoboot_txt_is_rewritten() {
        let old = Autoboot::for_slots(Slots { a: st(1, 0, true), b: st(2, 0, false) }, BOOT).render();
        let committed = Slots { a: st(1, 0, true), b: st(2, 0, true) };
        let new = Autoboot::for_slots(committed, BOOT).render();
        assert_ne!(old, new);
        let tmp = format!(".{AUTOBOOT}.tmp");
        type Cut<'a> = (&'a str, &'a dyn Fn(&Path));
        let cuts: [Cut; 5] = [
            ("before the temporary file", &|_| {}),
            ("temporary file empty", &|d| fs::write(d.join(&tmp), "").unwrap()),
            ("temporary file in part", &|d| fs::write(d.join(&tmp), &new[..new.len() / 2]).unwrap()),
            ("temporary file whole, not renamed", &|d| fs::write(d.join(&tmp), &new).unwrap()),
            ("renamed", &|d| fs::write(d.join(AUTOBOOT), &new).unwrap()),
        ];
        for (what, cut) in cuts {
            let dir = TempDir::new("rpi-cut");
            fs::write(dir.path().join(AUTOBOOT), &old).unwrap();
            cut(dir.path());
            let seen = fs::read_to_string(dir.path().join(AUTOBOOT)).unwrap();
            assert!(seen == old || seen == new, "{what}: the firmware reads {seen:?}");
            let parsed = Autoboot::parse(&seen).unwrap();
            assert!([2, 5].contains(&parsed.default), "{what}: the firmware boots a good slot");
            // Next boot: stage 1 applies the record (B committed) again.
            let fw =
                RpiFirmware { at: Location::Dir(dir.path().to_path_buf()), boot: BOOT, next_cmdline: None };
            assert_eq!(fw.apply(committed).unwrap(), seen != new, "{what}");
            assert_eq!(fs::read_to_string(dir.path().join(AUTOBOOT)).unwrap(), new, "{what}");
            assert_eq!(fw.read().unwrap(), Autoboot { default: 5, tryboot: 5 }, "{what}");
            if seen != new {
                assert!(!dir.path().join(&tmp).exists(), "{what}: the stale temporary file is gone");
            }
        }
    }

    #[test]
    fn reads_the_firmware_report_from_the_device_tree() {
        let dir = TempDir::new("rpi-dt");
        assert_eq!(Bootloader::read(&dir.path().join("none")).unwrap(), None);
        fs::write(dir.path().join("partition"), 5u32.to_be_bytes()).unwrap();
        assert_eq!(
            Bootloader::read(dir.path()).unwrap(),
            Some(Bootloader { partition: 5, tryboot: false }),
            "no tryboot property: an old firmware, never on trial"
        );
        fs::write(dir.path().join("tryboot"), 1u32.to_be_bytes()).unwrap();
        let bl = Bootloader::read(dir.path()).unwrap().unwrap();
        assert_eq!(bl, Bootloader { partition: 5, tryboot: true });
        assert_eq!(bl.slot(BOOT), Some(Slot::B));
        assert_eq!(Bootloader { partition: 1, tryboot: false }.slot(BOOT), None);
        fs::write(dir.path().join("partition"), b"5\0").unwrap();
        assert!(Bootloader::read(dir.path()).unwrap_err().to_string().contains("32-bit cell"));
    }

    fn boot_settings(v: serde_json::Value) -> crate::settings::boot::Boot {
        crate::settings::model::parse_for(&serde_json::json!({ "boot": v }), None).unwrap().boot.unwrap()
    }

    const IMAGE_LINE: &str = "console=tty1 console=ttyS1,115200 panic=10 berth.rootwait=60\n";

    #[test]
    fn cmdline_txt_gets_the_parameters_and_keeps_the_image_line() {
        let dir = TempDir::new("rpi-cmdline");
        let d = dir.path();
        fs::write(d.join(CMDLINE), IMAGE_LINE).unwrap();
        let none = boot_settings(serde_json::json!({"reboot-to-reconcile": false}));
        assert!(!write_cmdline(d, &none).unwrap(), "nothing to add: untouched");
        assert!(!d.join(CMDLINE_BASE).exists());
        let p = boot_settings(serde_json::json!({"kernel-parameters": {"nosmt": []},
                                                 "init-parameters": {"berth.rootwait": ["90"]}}));
        assert!(write_cmdline(d, &p).unwrap());
        let want =
            "console=tty1 console=ttyS1,115200 panic=10 berth.rootwait=60 nosmt -- berth.rootwait=90\n";
        assert_eq!(fs::read_to_string(d.join(CMDLINE)).unwrap(), want);
        assert_eq!(fs::read_to_string(d.join(CMDLINE_BASE)).unwrap(), IMAGE_LINE);
        assert!(!write_cmdline(d, &p).unwrap(), "the same again: no write (SD cards wear), not doubled");
        let q = boot_settings(serde_json::json!({"kernel-parameters": {"console": ["tty0"]}}));
        write_cmdline(d, &q).unwrap();
        assert_eq!(
            fs::read_to_string(d.join(CMDLINE)).unwrap(),
            "console=tty1 console=ttyS1,115200 panic=10 berth.rootwait=60 console=tty0\n"
        );
        // The parameters removed: the image's line again.
        assert!(write_cmdline(d, &none).unwrap());
        assert_eq!(fs::read_to_string(d.join(CMDLINE)).unwrap(), IMAGE_LINE);
        // An oversized file is refused, not read whole.
        fs::write(d.join(CMDLINE_BASE), "x".repeat(5000)).unwrap();
        assert!(write_cmdline(d, &q).is_err());
    }

    /// Power cuts while settings are first applied to `cmdline.txt`: the base written in part
    /// or whole, `cmdline.txt`'s temporary file in part or whole, renamed. The firmware always
    /// reads a whole line, the image's or the new one, and applying again ends with the new one.
    #[test]
    fn power_cut_while_cmdline_txt_is_rewritten() {
        let p = boot_settings(serde_json::json!({"kernel-parameters": {"nosmt": []}}));
        let new = "console=tty1 console=ttyS1,115200 panic=10 berth.rootwait=60 nosmt\n";
        let (tmp, tmp_base) = (format!(".{CMDLINE}.tmp"), format!(".{CMDLINE_BASE}.tmp"));
        type Cut<'a> = (&'a str, &'a dyn Fn(&Path));
        let cuts: [Cut; 6] = [
            ("before anything", &|_| {}),
            ("base's temporary file in part", &|d| fs::write(d.join(&tmp_base), &IMAGE_LINE[..9]).unwrap()),
            ("base written", &|d| fs::write(d.join(CMDLINE_BASE), IMAGE_LINE).unwrap()),
            ("cmdline's temporary file in part", &|d| {
                fs::write(d.join(CMDLINE_BASE), IMAGE_LINE).unwrap();
                fs::write(d.join(&tmp), &new[..20]).unwrap()
            }),
            ("cmdline's temporary file whole", &|d| {
                fs::write(d.join(CMDLINE_BASE), IMAGE_LINE).unwrap();
                fs::write(d.join(&tmp), new).unwrap()
            }),
            ("renamed", &|d| {
                fs::write(d.join(CMDLINE_BASE), IMAGE_LINE).unwrap();
                fs::write(d.join(CMDLINE), new).unwrap()
            }),
        ];
        for (what, cut) in cuts {
            let dir = TempDir::new("rpi-cmdline-cut");
            let d = dir.path();
            fs::write(d.join(CMDLINE), IMAGE_LINE).unwrap();
            cut(d);
            let seen = fs::read_to_string(d.join(CMDLINE)).unwrap();
            assert!(seen == IMAGE_LINE || seen == new, "{what}: the firmware reads {seen:?}");
            write_cmdline(d, &p).unwrap();
            assert_eq!(fs::read_to_string(d.join(CMDLINE)).unwrap(), new, "{what}");
            assert_eq!(fs::read_to_string(d.join(CMDLINE_BASE)).unwrap(), IMAGE_LINE, "{what}");
        }
    }

    #[test]
    fn apply_writes_the_bootable_slots_cmdline_txt() {
        let (a, b) = (TempDir::new("rpi-boot-a"), TempDir::new("rpi-boot-b"));
        for d in [&a, &b] {
            fs::write(d.path().join(CMDLINE), IMAGE_LINE).unwrap();
        }
        let dir = TempDir::new("rpi-autoboot");
        let fw = RpiFirmware {
            at: Location::Dir(dir.path().to_path_buf()),
            boot: BOOT,
            next_cmdline: Some(NextCmdline {
                boot: boot_settings(serde_json::json!({"kernel-parameters": {"nosmt": []}})),
                parts: [Location::Dir(a.path().to_path_buf()), Location::Dir(b.path().to_path_buf())],
            }),
        };
        assert!(fw.apply(Slots { a: st(1, 0, true), b: st(0, 0, false) }).unwrap());
        assert!(fs::read_to_string(a.path().join(CMDLINE)).unwrap().ends_with("nosmt\n"));
        assert_eq!(
            fs::read_to_string(b.path().join(CMDLINE)).unwrap(),
            IMAGE_LINE,
            "B cannot boot: untouched"
        );
        // An update wrote B (a fresh cmdline.txt) and activates it.
        fs::write(b.path().join(CMDLINE), "new image line\n").unwrap();
        fw.apply(Slots { a: st(1, 0, true), b: st(2, 1, false) }).unwrap();
        assert_eq!(fs::read_to_string(b.path().join(CMDLINE)).unwrap(), "new image line nosmt\n");
        let lines = fw.cmdlines().unwrap();
        assert_eq!(lines[1].as_deref(), Ok("new image line nosmt"));
    }
}
