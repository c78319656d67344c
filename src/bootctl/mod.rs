//! A/B boot control: which slot boots, and what a boot attempt does to the slots' state.
//!
//! The state of slot X lives in the GPT attribute bits of its `BERTH-BOOT-X` partition,
//! ChromeOS/Bottlerocket style: priority in bits 48–51, tries left in 52–55, successful in 56.
//! Rules: a slot is bootable when its priority is non-zero and it is successful or has tries
//! left; the bootable slot with the highest priority wins (A on a tie). Booting a slot that is
//! not yet successful uses up one try, so a version that never reaches "successful" is not
//! chosen again once its tries run out and the older slot boots instead.
//!
//! The GPT backend here serves direct kernel boot (QEMU) and is the state every backend keeps.
//!
//! Changes are transactions: [`BootControl::modify`] reads both slots' states, lets the caller
//! change them, and writes what changed back as one table write (both GPT copies, each made
//! durable before the other is touched; see `disk::gpt`). In the GPT backend every read and
//! every transaction holds one process-wide lock ([`GptBootControl`]'s `LOCK`), so the writers
//! in PID 1 (stage 2 marking the slot good after the health check, the updater's commands, the
//! API's rollback, which is an updater command) never interleave their read-modify-writes and
//! never read a table half-way through another thread's write. Stage 1 runs alone; at every
//! boot [`BootControl::begin_boot`] first repairs a GPT copy that is damaged or differs from the
//! other (a write cut short by a power cut) from the copy readers accept.
//!
//! Under UEFI the firmware, not stage 1, picks the slot to start: [`uefi`] tells it, after
//! every transaction, what the GPT state means (`BootOrder` for known-good slots, `BootNext`
//! for a slot on trial). It is installed once per boot ([`install_uefi`]); a transaction whose
//! firmware update fails is undone, so the GPT record and the firmware never disagree for
//! long, and stage 1 makes them agree again at every boot ([`GptBootControl::sync_firmware`]).
//!
//! The next boot's command line (`settings.boot`) goes where the firmware reads it: the UEFI
//! entries' optional data without Secure Boot ([`uefi`]), each slot's `cmdline.txt` on a Pi
//! ([`rpi`]). Stage 2 hands the settings over with [`set_boot_settings`]; from then on every
//! transaction writes them again (so a slot the updater wrote gets its own line), and
//! [`cmdline_report`] says what each slot's next boot gets, or why nothing can be set here
//! ([`boot_settings_support`]).
//!
//! On a Raspberry Pi the firmware boots the partition `autoboot.txt` names, or once its
//! `[tryboot]` partition after a `reboot "0 tryboot"`: [`rpi`] rewrites `autoboot.txt` after
//! every transaction the same way ([`install_rpi`]), and [`restart_argument`] makes every
//! restart of PID 1 a tryboot restart while the record's choice is a slot on trial.

pub mod rpi;
pub mod uefi;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::{Index, IndexMut};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::warn;
use serde::{Deserialize, Serialize};

use crate::disk::gpt::{self, Gpt};
use crate::disk::verity::VerityParams;

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const STATE_MASK: u64 = 0x1ff << 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "A" | "a" => Some(Slot::A),
            "B" | "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// Partition label of this slot's `kind` (BOOT, ROOT or HASH).
    pub fn label(self, kind: &str) -> String {
        format!("BERTH-{kind}-{}", self.letter())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// The boot-control state of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlotState {
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
}

impl SlotState {
    pub fn from_attributes(attrs: u64) -> SlotState {
        SlotState {
            priority: ((attrs >> PRIORITY_SHIFT) & 0xf) as u8,
            tries: ((attrs >> TRIES_SHIFT) & 0xf) as u8,
            successful: attrs & SUCCESSFUL_BIT != 0,
        }
    }

    /// `attrs` with this state's bits in place of the old ones; other bits are kept.
    pub fn to_attributes(self, attrs: u64) -> u64 {
        (attrs & !STATE_MASK)
            | ((self.priority as u64 & 0xf) << PRIORITY_SHIFT)
            | ((self.tries as u64 & 0xf) << TRIES_SHIFT)
            | if self.successful { SUCCESSFUL_BIT } else { 0 }
    }

    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }
}

/// Both slots' states, indexed by slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Slots {
    pub a: SlotState,
    pub b: SlotState,
}

impl Index<Slot> for Slots {
    type Output = SlotState;
    fn index(&self, slot: Slot) -> &SlotState {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

impl IndexMut<Slot> for Slots {
    fn index_mut(&mut self, slot: Slot) -> &mut SlotState {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }
}

/// The slot to boot given both states, or None when neither is bootable.
pub fn choose(a: SlotState, b: SlotState) -> Option<Slot> {
    match (a.bootable(), b.bootable()) {
        (true, true) if b.priority > a.priority => Some(Slot::B),
        (true, _) => Some(Slot::A),
        (false, true) => Some(Slot::B),
        (false, false) => None,
    }
}

/// What stage 1 decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootAttempt {
    pub slot: Slot,
    /// The slot was not yet marked successful: this boot used up one of its tries.
    pub on_trial: bool,
    /// Tries left after this attempt.
    pub tries_left: u8,
}

#[derive(Debug)]
pub enum Error {
    Open(PathBuf, std::io::Error),
    Gpt(PathBuf, gpt::Error),
    MissingPartition(String),
    NothingBootable {
        a: SlotState,
        b: SlotState,
    },
    /// The firmware's boot variables could not be read or written (UEFI backend).
    Firmware(uefi::Error),
    /// `autoboot.txt` or the firmware's report could not be read or written (Raspberry Pi).
    Rpi(rpi::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(p, e) => write!(f, "opening {}: {e}", p.display()),
            Error::Gpt(p, e) => write!(f, "partition table of {}: {e}", p.display()),
            Error::MissingPartition(l) => write!(f, "no partition labelled {l}"),
            Error::NothingBootable { a, b } => {
                write!(f, "no bootable slot (A: {a:?}, B: {b:?}); reinstall or repair the disk")
            }
            Error::Firmware(e) => write!(f, "firmware boot variables: {e}"),
            Error::Rpi(e) => write!(f, "Raspberry Pi firmware: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The operations every boot-control backend offers.
pub trait BootControl {
    /// Both slots' states as they are now.
    fn states(&mut self) -> Result<Slots, Error>;

    /// One transaction: read both slots' states, let `change` edit them (or refuse, which
    /// writes nothing), and write back what changed in one table write. Nothing else in this
    /// process reads or changes boot control meanwhile.
    fn modify<R, E: From<Error>>(&mut self, change: impl FnOnce(&mut Slots) -> Result<R, E>) -> Result<R, E>;

    /// Make a damaged or stale copy of the state whole again; returns what was wrong, if
    /// anything. Backends with a single copy have nothing to do.
    fn repair(&mut self) -> Result<Option<String>, Error> {
        Ok(None)
    }

    fn state(&mut self, slot: Slot) -> Result<SlotState, Error> {
        Ok(self.states()?[slot])
    }

    fn set_state(&mut self, slot: Slot, state: SlotState) -> Result<(), Error> {
        self.modify(|s| {
            s[slot] = state;
            Ok::<_, Error>(())
        })
    }

    /// Repair the state if it needs it, then pick the slot to boot and use up one try if it
    /// is on trial (stage 1).
    fn begin_boot(&mut self, forced: Option<Slot>) -> Result<BootAttempt, Error> {
        match self.repair() {
            Ok(Some(why)) => warn!("boot control: repaired the partition table: {why}"),
            Ok(None) => {}
            Err(e) => warn!("boot control: could not repair the partition table: {e}"),
        }
        self.modify(|s| {
            let slot = match forced {
                Some(slot) => slot,
                None => choose(s.a, s.b).ok_or(Error::NothingBootable { a: s.a, b: s.b })?,
            };
            let st = &mut s[slot];
            let on_trial = !st.successful;
            if on_trial && st.tries > 0 {
                st.tries -= 1;
            }
            Ok(BootAttempt { slot, on_trial, tries_left: st.tries })
        })
    }

    /// Mark `slot` good: it stays bootable from now on. Returns whether anything changed.
    fn mark_successful(&mut self, slot: Slot) -> Result<bool, Error> {
        self.modify(|s| {
            let st = &mut s[slot];
            if st.successful && st.tries == 0 {
                return Ok::<_, Error>(false);
            }
            st.successful = true;
            st.tries = 0;
            Ok(true)
        })
    }
}

/// The one lock every GPT boot-control read and transaction in this process holds.
static LOCK: Mutex<()> = Mutex::new(());

/// The firmware that picks the slot, told after each transaction: UEFI or the Pi's.
enum Firmware {
    Uefi(uefi::UefiFirmware),
    /// With the disk whose record it follows (for [`restart_argument`]).
    Rpi(rpi::RpiFirmware, PathBuf, u64),
}

impl Firmware {
    /// Tell the firmware what `slots` means. Returns whether anything was written.
    fn apply(&self, slots: Slots) -> Result<bool, Error> {
        match self {
            Firmware::Uefi(fw) => fw.apply(slots).map(|a| !a.written.is_empty()).map_err(Error::Firmware),
            Firmware::Rpi(fw, ..) => fw.apply(slots).map_err(Error::Rpi),
        }
    }
}

/// The firmware to tell after each transaction, when it (not stage 1) picks the slot.
static FIRMWARE: Mutex<Option<Firmware>> = Mutex::new(None);

fn firmware() -> std::sync::MutexGuard<'static, Option<Firmware>> {
    FIRMWARE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Use the UEFI backend from now on, for `disk`'s slots (variables in `efivars`). Returns the
/// backend's view of the firmware, for stage 1's checks.
pub fn install_uefi(disk: &Path, sector: u64, efivars: &Path) -> Result<(), Error> {
    let mut f = File::open(disk).map_err(|e| Error::Open(disk.to_path_buf(), e))?;
    let gpt = Gpt::read(&mut f, sector).map_err(|e| Error::Gpt(disk.to_path_buf(), e))?;
    let hd = |slot: Slot| {
        let label = slot.label("BOOT");
        gpt.by_name(&label).map(|p| uefi::Hd::of(&p)).ok_or(Error::MissingPartition(label))
    };
    let fw = uefi::UefiFirmware {
        vars: uefi::Vars::new(efivars),
        boot: [hd(Slot::A)?, hd(Slot::B)?],
        next_cmdline: None,
    };
    *firmware() = Some(Firmware::Uefi(fw));
    Ok(())
}

/// Whether the UEFI backend is in use.
pub fn uefi_installed() -> bool {
    matches!(*firmware(), Some(Firmware::Uefi(_)))
}

/// How this boot was started, for `GET /os`: the boot-control backend (`uefi` when the
/// firmware chose the slot, `gpt` when the GPT's priority flags did) and whether UEFI Secure
/// Boot is on (always false without UEFI).
pub fn os_summary() -> serde_json::Value {
    let (backend, secure) = match firmware().as_ref() {
        Some(Firmware::Uefi(f)) => ("uefi", f.vars.secure_boot()),
        Some(Firmware::Rpi(..)) => ("rpi", false),
        None => ("gpt", false),
    };
    serde_json::json!({"backend": backend, "secure_boot": secure})
}

/// Use the Raspberry Pi backend from now on, for `disk`'s slots, with `autoboot.txt` at `at`
/// (the `BERTH-AUTOBOOT` partition). Returns the partition numbers of BOOT-A and BOOT-B.
pub fn install_rpi(disk: &Path, sector: u64, at: rpi::Location) -> Result<[u32; 2], Error> {
    let _held = lock();
    let mut f = File::open(disk).map_err(|e| Error::Open(disk.to_path_buf(), e))?;
    let gpt = Gpt::read(&mut f, sector).map_err(|e| Error::Gpt(disk.to_path_buf(), e))?;
    let number = |slot: Slot| {
        let label = slot.label("BOOT");
        gpt.by_name(&label).map(|p| p.number).ok_or(Error::MissingPartition(label))
    };
    let boot = [number(Slot::A)?, number(Slot::B)?];
    *firmware() =
        Some(Firmware::Rpi(rpi::RpiFirmware { at, boot, next_cmdline: None }, disk.to_path_buf(), sector));
    Ok(boot)
}

/// Whether the Raspberry Pi backend is in use.
pub fn rpi_installed() -> bool {
    matches!(*firmware(), Some(Firmware::Rpi(..)))
}

/// The argument a restart must pass to reboot(2), if any: `"0 tryboot"` on a Raspberry Pi
/// while the record chooses a slot on trial (the firmware then boots it once). Reading the
/// record failing means a plain restart, which boots the known-good slot.
pub fn restart_argument() -> Option<&'static str> {
    let (disk, sector) = match firmware().as_ref()? {
        Firmware::Rpi(_, disk, sector) => (disk.clone(), *sector),
        Firmware::Uefi(_) => return None,
    };
    let slots = GptBootControl::new(&disk, sector).states().ok()?;
    rpi::tryboot_pending(slots).then_some(rpi::TRYBOOT_ARG)
}

/// What the firmware says now, for `GET /boot`. UEFI: `BootCurrent`, `BootOrder`,
/// `BootNext`, the numbers of Berth's entries, Secure Boot. Raspberry Pi: the partitions
/// `autoboot.txt` names, and the slots' BOOT partition numbers.
pub fn firmware_report() -> Option<serde_json::Value> {
    let fw = firmware();
    let fw = match fw.as_ref()? {
        Firmware::Uefi(fw) => fw,
        Firmware::Rpi(fw, ..) => {
            return Some(serde_json::json!({
                "autoboot": fw.read().ok().map(|a| serde_json::json!({
                    "boot_partition": a.default, "tryboot_partition": a.tryboot})),
                "boot_partitions": {"A": fw.boot[0], "B": fw.boot[1]},
            }))
        }
    };
    let hex = |l: Vec<u16>| l.into_iter().map(|n| format!("{n:04X}")).collect::<Vec<_>>();
    let get = |name: &str| fw.vars.get_u16s(name).map(hex).unwrap_or_default();
    Some(serde_json::json!({
        "boot_current": get("BootCurrent").first(),
        "boot_order": get("BootOrder"),
        "boot_next": get("BootNext").first(),
        "entries": fw.entries().map(|e| serde_json::json!({"A": format!("{:04X}", e[0]), "B": format!("{:04X}", e[1])})).ok(),
        "secure_boot": fw.vars.secure_boot(),
        "lockdown": std::fs::read_to_string("/sys/kernel/security/lockdown").ok().map(|l| l.trim().to_string()),
    }))
}

/// Whether this boot's path lets Berth give the next boot a command line: Ok, or why not
/// (the refusal `settings.boot` gets). `backend` and `secure_boot` are stage 1's findings.
pub fn boot_settings_support(backend: &str, secure_boot: bool) -> Result<(), String> {
    match (backend, secure_boot) {
        ("uefi", false) | ("rpi", _) => Ok(()),
        ("uefi", true) => {
            Err("refused on this node: UEFI Secure Boot is on, and it authenticates the kernel \
                               command line (the signed UKI's, which carries the dm-verity root hash), so \
                               nothing written at run time can change it; build an image with the \
                               arguments instead (BERTH_CMDLINE_EXTRA in scripts/build-uki, docs/boot.md)"
                .into())
        }
        _ => Err("refused on this node: it was booted without a boot loader Berth controls (direct \
                  kernel boot, e.g. QEMU -kernel), so whoever starts the kernel gives its command line \
                  (QEMU's -append); set the arguments there"
            .into()),
    }
}

/// The disk and the slots' BOOT partitions (devices) that [`set_boot_settings`] writes to,
/// registered by stage 2 once it knows them.
static BOOT_PARTS: Mutex<Option<(PathBuf, u64, [PathBuf; 2])>> = Mutex::new(None);

pub fn register_boot_partitions(disk: &Path, sector: u64, parts: [PathBuf; 2]) {
    *BOOT_PARTS.lock().unwrap_or_else(|e| e.into_inner()) = Some((disk.to_path_buf(), sector, parts));
}

/// Give the firmware `boot` (settings.boot) for the slots' next command lines and write them
/// now. Returns whether anything was written, or None where nothing is told (no firmware
/// backend: direct kernel boot, dev mode).
pub fn set_boot_settings(boot: &crate::settings::boot::Boot) -> Result<Option<bool>, Error> {
    let Some((disk, sector, parts)) = BOOT_PARTS.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return Ok(None);
    };
    {
        let mut fw = firmware();
        match fw.as_mut() {
            Some(Firmware::Uefi(f)) => {
                f.next_cmdline =
                    Some(uefi::NextCmdline { boot: boot.clone(), ukis: parts.map(uefi::UkiAt::Partition) })
            }
            Some(Firmware::Rpi(f, ..)) => {
                f.next_cmdline =
                    Some(rpi::NextCmdline { boot: boot.clone(), parts: parts.map(rpi::Location::Partition) })
            }
            None => return Ok(None),
        }
    }
    GptBootControl::new(&disk, sector).sync_firmware()
}

/// The command line `slot`'s next boot gets, as the firmware holds it now: Ok(None) for the
/// UKI's own line (an entry without optional data), which is read from the UKI only when
/// `read_own` (it mounts the slot's BOOT partition; slow under emulation, so not for the API).
/// None without a firmware backend, or before stage 2 handed the settings over.
pub fn next_cmdline(slot: Slot, read_own: bool) -> Option<Result<Option<String>, String>> {
    match firmware().as_ref()? {
        Firmware::Uefi(f) => {
            let next = f.next_cmdline.as_ref()?;
            Some(match f.entry_cmdlines()[slot as usize].clone() {
                Ok(None) if read_own => next.ukis[slot as usize].own_cmdline(slot).map(Some),
                other => other,
            })
        }
        Firmware::Rpi(f, ..) => f.cmdlines().map(|l| l[slot as usize].clone().map(Some)),
    }
}

/// The kernel command line of this boot, and what each slot's next boot gets (or why that
/// cannot be known or set), for `GET /boot`.
pub fn cmdline_report() -> serde_json::Value {
    let current = std::fs::read_to_string("/proc/cmdline").ok().map(|l| l.trim_end().to_string());
    let show = |r: Result<Option<String>, String>| match r {
        Ok(line) => serde_json::json!(line),
        Err(e) => serde_json::json!({"error": e}),
    };
    let source = match firmware().as_ref() {
        Some(Firmware::Uefi(_)) => "boot entries",
        Some(Firmware::Rpi(..)) => "cmdline.txt",
        None => "",
    };
    // null: the UKI's own command line (its entry carries none).
    let next = match (next_cmdline(Slot::A, false), next_cmdline(Slot::B, false)) {
        (Some(a), Some(b)) => serde_json::json!({"A": show(a), "B": show(b), "source": source}),
        _ => serde_json::Value::Null,
    };
    let why_not = crate::settings::boot::node_refusal();
    serde_json::json!({"current": current, "next": next, "settable": why_not.is_none(), "why_not": why_not})
}

/// The slot the running UKI was loaded from, as the firmware says (UEFI backend only).
pub fn uefi_loaded_from() -> Option<Slot> {
    match firmware().as_ref()? {
        Firmware::Uefi(f) => f.loaded_from(),
        Firmware::Rpi(..) => None,
    }
}

/// Boot control kept in the GPT of `disk` (a block device or an image file).
pub struct GptBootControl {
    disk: PathBuf,
    sector: u64,
}

impl GptBootControl {
    pub fn new(disk: &Path, sector: u64) -> GptBootControl {
        GptBootControl { disk: disk.to_path_buf(), sector }
    }

    fn open(&self, write: bool) -> Result<File, Error> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.disk)
            .map_err(|e| Error::Open(self.disk.clone(), e))
    }

    fn gpt_error(&self, e: gpt::Error) -> Error {
        Error::Gpt(self.disk.clone(), e)
    }

    /// The table and the partition numbers of BOOT-A and BOOT-B in it.
    fn read(&self, f: &mut File) -> Result<(Gpt, [u32; 2]), Error> {
        let gpt = Gpt::read(f, self.sector).map_err(|e| self.gpt_error(e))?;
        let number = |slot: Slot| {
            let label = slot.label("BOOT");
            gpt.by_name(&label).map(|p| p.number).ok_or(Error::MissingPartition(label))
        };
        let numbers = [number(Slot::A)?, number(Slot::B)?];
        Ok((gpt, numbers))
    }

    fn write_states(
        &self,
        f: &mut File,
        gpt: &mut Gpt,
        numbers: [u32; 2],
        states: Slots,
    ) -> Result<(), Error> {
        for (slot, n) in [(Slot::A, numbers[0]), (Slot::B, numbers[1])] {
            let attrs = gpt.partitions().into_iter().find(|p| p.number == n).map_or(0, |p| p.attributes);
            gpt.set_attributes(n, states[slot].to_attributes(attrs)).map_err(|e| self.gpt_error(e))?;
        }
        gpt.write(f).map_err(|e| self.gpt_error(e))
    }

    /// Tell the firmware what the state is now, whether or not it changed (stage 1, every
    /// boot: entries missing after NVRAM was cleared, a transaction cut short between the GPT
    /// and the firmware). Returns whether anything was written, or None without a firmware
    /// backend.
    pub fn sync_firmware(&mut self) -> Result<Option<bool>, Error> {
        let _held = lock();
        let fw = firmware();
        let Some(fw) = fw.as_ref() else { return Ok(None) };
        let mut f = self.open(false)?;
        let (gpt, numbers) = self.read(&mut f)?;
        fw.apply(Self::slots(&gpt, numbers)).map(Some)
    }

    fn slots(gpt: &Gpt, numbers: [u32; 2]) -> Slots {
        let attrs = |n: u32| gpt.partitions().into_iter().find(|p| p.number == n).map_or(0, |p| p.attributes);
        Slots {
            a: SlotState::from_attributes(attrs(numbers[0])),
            b: SlotState::from_attributes(attrs(numbers[1])),
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    // A panic while holding it leaves nothing half-done in memory: the disk is re-read.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

impl BootControl for GptBootControl {
    fn states(&mut self) -> Result<Slots, Error> {
        let _held = lock();
        let mut f = self.open(false)?;
        let (gpt, numbers) = self.read(&mut f)?;
        Ok(Self::slots(&gpt, numbers))
    }

    fn modify<R, E: From<Error>>(&mut self, change: impl FnOnce(&mut Slots) -> Result<R, E>) -> Result<R, E> {
        let _held = lock();
        let mut f = self.open(true)?;
        let (mut gpt, numbers) = self.read(&mut f)?;
        let before = Self::slots(&gpt, numbers);
        let mut after = before;
        let r = change(&mut after)?;
        if after != before {
            self.write_states(&mut f, &mut gpt, numbers, after)?;
            if let Some(fw) = firmware().as_ref() {
                // The record and the firmware change together, or neither does.
                if let Err(e) = fw.apply(after) {
                    self.write_states(&mut f, &mut gpt, numbers, before)?;
                    let _ = fw.apply(before);
                    return Err(e.into());
                }
            }
        }
        Ok(r)
    }

    fn repair(&mut self) -> Result<Option<String>, Error> {
        let _held = lock();
        let mut f = self.open(true)?;
        Gpt::repair(&mut f, self.sector).map_err(|e| self.gpt_error(e))
    }
}

/// A slot's metadata, the `slot.toml` file on its BOOT partition, written by the image build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SlotMeta {
    pub version: String,
    pub variant: String,
    pub arch: String,
    pub verity: VerityParams,
}

impl SlotMeta {
    pub const FILE: &'static str = "slot.toml";

    pub fn parse(text: &str) -> Result<SlotMeta, String> {
        let m: SlotMeta = toml::from_str(text).map_err(|e| e.to_string())?;
        m.verity.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(priority: u8, tries: u8, successful: bool) -> SlotState {
        SlotState { priority, tries, successful }
    }

    #[test]
    fn attribute_bits_round_trip_and_keep_other_bits() {
        let s = st(15, 3, true);
        let attrs = s.to_attributes(0x1 | (1 << 63));
        assert_eq!(attrs, 0x1 | (1 << 63) | (15 << 48) | (3 << 52) | (1 << 56));
        assert_eq!(SlotState::from_attributes(attrs), s);
    }

    #[test]
    fn choice_table() {
        let good = |p| st(p, 0, true);
        let trial = |p, t| st(p, t, false);
        let cases = [
            (good(1), st(0, 0, false), Some(Slot::A), "fresh image boots A"),
            (good(1), trial(2, 1), Some(Slot::B), "update on trial wins"),
            (good(1), trial(2, 0), Some(Slot::A), "failed update falls back"),
            (good(2), good(1), Some(Slot::A), "higher priority wins"),
            (good(1), good(1), Some(Slot::A), "tie goes to A"),
            (trial(1, 0), good(1), Some(Slot::B), "A exhausted"),
            (trial(1, 0), trial(1, 0), None, "nothing left"),
            (st(0, 5, true), st(0, 0, true), None, "priority 0 never boots"),
        ];
        for (a, b, want, what) in cases {
            assert_eq!(choose(a, b), want, "{what}");
        }
    }

    struct Mem(Slots);
    impl BootControl for Mem {
        fn states(&mut self) -> Result<Slots, Error> {
            Ok(self.0)
        }
        fn modify<R, E: From<Error>>(
            &mut self,
            change: impl FnOnce(&mut Slots) -> Result<R, E>,
        ) -> Result<R, E> {
            let mut s = self.0;
            let r = change(&mut s)?;
            self.0 = s;
            Ok(r)
        }
    }

    fn mem(a: SlotState, b: SlotState) -> Mem {
        Mem(Slots { a, b })
    }

    #[test]
    fn a_failing_update_rolls_back_by_itself() {
        let mut bc = mem(st(1, 0, true), st(2, 1, false));
        let first = bc.begin_boot(None).unwrap();
        assert_eq!((first.slot, first.on_trial, first.tries_left), (Slot::B, true, 0));
        // B never marked successful: the next boot takes A.
        let second = bc.begin_boot(None).unwrap();
        assert_eq!((second.slot, second.on_trial), (Slot::A, false));
    }

    #[test]
    fn marking_success_keeps_the_slot() {
        let mut bc = mem(st(1, 0, true), st(2, 1, false));
        bc.begin_boot(None).unwrap();
        assert!(bc.mark_successful(Slot::B).unwrap());
        assert!(!bc.mark_successful(Slot::B).unwrap());
        assert_eq!(bc.begin_boot(None).unwrap().slot, Slot::B);
    }

    fn image(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-bootctl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, crate::disk::gpt::tests::sample_disk().into_inner()).unwrap();
        img
    }

    #[test]
    fn gpt_backend_on_an_image() {
        let img = image("backend");
        let mut bc = GptBootControl::new(&img, 512);
        assert_eq!(bc.state(Slot::A).unwrap(), st(1, 0, false));
        bc.set_state(Slot::A, st(3, 2, true)).unwrap();
        assert_eq!(GptBootControl::new(&img, 512).state(Slot::A).unwrap(), st(3, 2, true));
        // A refused transaction writes nothing.
        let before = std::fs::read(&img).unwrap();
        let r: Result<(), Error> = bc.modify(|s| {
            s.b = st(9, 9, true);
            Err(Error::MissingPartition("refused".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&img).unwrap(), before);
        std::fs::remove_dir_all(img.parent().unwrap()).unwrap();
    }

    /// Stage 2's mark_successful and the updater's transactions, from several threads at once
    /// on one disk: the lock makes each read-modify-write whole, so no change is lost.
    #[test]
    fn concurrent_transactions_lose_no_change() {
        let img = image("lock");
        GptBootControl::new(&img, 512).set_state(Slot::A, st(0, 0, false)).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let img = img.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        GptBootControl::new(&img, 512)
                            .modify(|s| {
                                // Count in A's priority and tries (0..=255).
                                let n = s.a.priority as u32 * 16 + s.a.tries as u32 + 1;
                                s.a.priority = (n / 16) as u8;
                                s.a.tries = (n % 16) as u8;
                                Ok::<_, Error>(())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let a = GptBootControl::new(&img, 512).state(Slot::A).unwrap();
        assert_eq!(a.priority as u32 * 16 + a.tries as u32, 100);
        std::fs::remove_dir_all(img.parent().unwrap()).unwrap();
    }

    #[test]
    fn begin_boot_repairs_a_damaged_copy_first() {
        let img = image("repair");
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[512 + 8] ^= 1; // primary header
        std::fs::write(&img, &bytes).unwrap();
        let mut bc = GptBootControl::new(&img, 512);
        bc.set_state(Slot::B, st(2, 1, false)).unwrap();
        // Damage the backup now: the primary is whole again since the write above.
        let mut bytes = std::fs::read(&img).unwrap();
        let last = bytes.len() - 512;
        bytes[last + 8] ^= 1;
        std::fs::write(&img, &bytes).unwrap();
        let attempt = bc.begin_boot(None).unwrap();
        assert_eq!((attempt.slot, attempt.on_trial, attempt.tries_left), (Slot::B, true, 0));
        let copies =
            crate::disk::gpt::Gpt::read_copies(&mut std::fs::File::open(&img).unwrap(), 512).unwrap();
        assert!(copies.primary.is_ok() && copies.backup.is_ok(), "{copies:?}");
        assert_eq!(bc.repair().unwrap(), None);
        std::fs::remove_dir_all(img.parent().unwrap()).unwrap();
    }

    #[test]
    fn slot_meta_parses_and_rejects_unknown_keys() {
        let text = r#"
version = "1.0.0"
variant = "berth-qemu"
arch = "x86_64"
[verity]
algorithm = "sha256"
data-block-size = 4096
hash-block-size = 4096
data-blocks = 10
hash-start-block = 1
salt = "00ff"
root-hash = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
        let m = SlotMeta::parse(text).unwrap();
        assert_eq!(m.verity.data_blocks, 10);
        let bad = text.replace("arch =", "arhc =");
        assert!(SlotMeta::parse(&bad).unwrap_err().contains("arhc"));
    }
}
