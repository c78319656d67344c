//! Boot control through the UEFI firmware, with no boot loader: each slot's BOOT partition is
//! an EFI system partition holding that slot's unified kernel image (UKI), and the firmware's
//! own `Boot####` entries, `BootOrder` and `BootNext` choose which one starts.
//!
//! The GPT attribute bits stay the record of both slots' states (what the API and `bootctl
//! show` report, and what the updater changes); after every boot-control transaction the
//! firmware is told what they mean ([`UefiFirmware::apply`]):
//! - a slot that is bootable and successful (known good) is in `BootOrder`, the highest
//!   priority first, before every entry that is not Berth's (those keep their order);
//! - a slot on trial (bootable, not yet successful: an update just activated) is `BootNext`,
//!   which the firmware deletes before it starts the entry: one try by construction. If that
//!   boot fails in any way (a panic, dm-verity, the health timeout, the watchdog), the next
//!   boot is `BootOrder`'s first entry, the known-good slot, without userspace taking part;
//! - a slot that is neither is in neither.
//!
//! Entries are `Boot####` load options named `Berth A` and `Berth B`, whose device path is the
//! slot's BOOT partition (by its GPT number, start, size and unique GUID) and the slot's UKI,
//! `\EFI\BERTH\A.EFI` or `\EFI\BERTH\B.EFI`. Entries are created when missing (the first
//! boot, after NVRAM was cleared) at the lowest free number; variables are only written when
//! they change.
//!
//! **The next boot's command line.** Without Secure Boot, systemd-stub takes an entry's
//! optional data (UTF-16, its first character printable) as the kernel command line *instead
//! of* the UKI's own `.cmdline` section; with Secure Boot on it ignores it. So an entry carries
//! no optional data unless `settings.boot` adds parameters on a machine without Secure Boot
//! ([`NextCmdline`]); then it carries the slot's own line, read from the `.cmdline` section of
//! that slot's UKI on its BOOT partition ([`pe_section`]; never `/proc/cmdline`, which is the
//! running slot's), followed by the parameters (`settings::boot::compose`). It is computed
//! again at every transaction, so a UKI the updater wrote into a slot gets its own line (its
//! root hash) when the slot is activated; a slot that is not bootable gets no optional data, so
//! a UKI half-written into it never stops a transaction. Stage 1, which does not read settings,
//! leaves the entries' optional data as it finds it. The removable-media path
//! (`\EFI\BOOT\BOOTX64.EFI`, the first boot before entries exist) has no entry and so no
//! optional data: the first boot always has the image's own line.
//!
//! efivarfs marks variables immutable; the flag is cleared just before a write or delete.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use log::info;

#[cfg(test)]
use super::SlotState;
use super::{Slot, Slots};
use crate::disk::gpt::{Guid, Partition};

/// Where the kernel exposes EFI variables.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// EFI_GLOBAL_VARIABLE.
pub const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// systemd's loader interface (systemd-stub sets `LoaderDevicePartUUID` in it).
pub const LOADER: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS.
const NV_BS_RT: u32 = 0x7;
const LOAD_OPTION_ACTIVE: u32 = 0x1;

/// The UKI of `slot` on its BOOT partition, as the firmware names it.
pub fn uki_path(slot: Slot) -> String {
    format!("\\EFI\\BERTH\\{}.EFI", slot.letter())
}

/// The description of `slot`'s boot entry.
pub fn entry_name(slot: Slot) -> String {
    format!("Berth {}", slot.letter())
}

#[derive(Debug)]
pub enum Error {
    Io {
        var: String,
        error: io::Error,
    },
    Malformed {
        var: String,
        why: String,
    },
    NoFreeEntry,
    /// A slot's command line for its entry could not be made (its UKI unreadable, too long).
    Cmdline {
        slot: Slot,
        why: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { var, error } => write!(f, "EFI variable {var}: {error}"),
            Error::Malformed { var, why } => write!(f, "EFI variable {var} is malformed: {why}"),
            Error::NoFreeEntry => write!(f, "no free Boot#### number"),
            Error::Cmdline { slot, why } => write!(f, "the command line for slot {slot}'s entry: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// EFI variables as efivarfs shows them: a file `NAME-GUID` holding 4 bytes of attributes and
/// the value. `dir` is efivarfs, or a plain directory in tests.
#[derive(Debug, Clone)]
pub struct Vars {
    pub dir: PathBuf,
}

impl Vars {
    pub fn new(dir: impl Into<PathBuf>) -> Vars {
        Vars { dir: dir.into() }
    }

    fn path(&self, name: &str, guid: &str) -> PathBuf {
        self.dir.join(format!("{name}-{guid}"))
    }

    /// The value of `name`, or None if it does not exist.
    pub fn get(&self, name: &str, guid: &str) -> Result<Option<Vec<u8>>, Error> {
        match fs::read(self.path(name, guid)) {
            Ok(b) if b.len() >= 4 => Ok(Some(b[4..].to_vec())),
            Ok(_) => Err(Error::Malformed { var: name.into(), why: "shorter than its attributes".into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::Io { var: name.into(), error }),
        }
    }

    /// Set `name` (non-volatile, boot and runtime access) unless it already holds `value`.
    /// Returns whether it was written.
    pub fn set(&self, name: &str, guid: &str, value: &[u8]) -> Result<bool, Error> {
        if self.get(name, guid)?.as_deref() == Some(value) {
            return Ok(false);
        }
        let path = self.path(name, guid);
        crate::sys::clear_immutable(&path).map_err(|error| Error::Io { var: name.into(), error })?;
        let mut data = NV_BS_RT.to_le_bytes().to_vec();
        data.extend_from_slice(value);
        // efivarfs takes a variable's new value in a single write.
        use std::io::Write;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&data))
            .map_err(|error| Error::Io { var: name.into(), error })?;
        Ok(true)
    }

    /// Delete `name` if it exists; returns whether it did.
    pub fn delete(&self, name: &str, guid: &str) -> Result<bool, Error> {
        let path = self.path(name, guid);
        if !path.exists() {
            return Ok(false);
        }
        crate::sys::clear_immutable(&path).map_err(|error| Error::Io { var: name.into(), error })?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(Error::Io { var: name.into(), error }),
        }
    }

    /// A list of u16 (BootOrder), or empty.
    pub fn get_u16s(&self, name: &str) -> Result<Vec<u16>, Error> {
        let v = self.get(name, GLOBAL)?.unwrap_or_default();
        if v.len() % 2 != 0 {
            return Err(Error::Malformed {
                var: name.into(),
                why: format!("{} bytes, not a list of u16", v.len()),
            });
        }
        Ok(v.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    }

    fn set_u16s(&self, name: &str, list: &[u16]) -> Result<bool, Error> {
        let bytes: Vec<u8> = list.iter().flat_map(|n| n.to_le_bytes()).collect();
        self.set(name, GLOBAL, &bytes)
    }

    /// A UTF-16 string variable (LoaderDevicePartUUID), without its terminating NUL.
    pub fn get_string(&self, name: &str, guid: &str) -> Result<Option<String>, Error> {
        Ok(self.get(name, guid)?.map(|b| {
            let units: Vec<u16> = b
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16_lossy(&units)
        }))
    }

    /// Whether the firmware booted with Secure Boot enforcing (`SecureBoot` is 1).
    pub fn secure_boot(&self) -> bool {
        matches!(self.get("SecureBoot", GLOBAL), Ok(Some(v)) if v.first() == Some(&1))
    }
}

/// A partition as a UEFI device path names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hd {
    pub number: u32,
    pub start_lba: u64,
    pub size_lba: u64,
    pub guid: Guid,
}

impl Hd {
    pub fn of(p: &Partition) -> Hd {
        Hd {
            number: p.number,
            start_lba: p.first_lba,
            size_lba: p.last_lba + 1 - p.first_lba,
            guid: p.unique_guid,
        }
    }
}

/// An EFI_LOAD_OPTION for a file on a partition: attributes, description, device path
/// HD(...)/\path, and no optional data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    pub active: bool,
    pub description: String,
    pub hd: Option<Hd>,
    pub path: Option<String>,
    /// Bytes after the device path: empty, or a command line for systemd-stub
    /// ([`cmdline_data`]).
    pub optional_data: Vec<u8>,
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16().chain([0]).flat_map(|u| u.to_le_bytes()).collect()
}

/// A command line as a load option's optional data for systemd-stub: UTF-16LE with a
/// terminating NUL. The stub takes it only if its first character is above 0x1F, and keeps
/// the low byte of each character, so the line must be printable ASCII (settings are checked
/// for that; anything else is refused here too).
pub fn cmdline_data(line: &str) -> Result<Vec<u8>, String> {
    if line.is_empty() || !line.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) || line.starts_with(' ') {
        return Err(
            "a command line for systemd-stub must be printable ASCII, not starting with a space".into()
        );
    }
    Ok(utf16z(line))
}

/// The command line in an entry's optional data, if it holds one ([`cmdline_data`]'s form).
pub fn data_cmdline(data: &[u8]) -> Option<String> {
    if data.len() < 2 || !data.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> =
        data.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    (units.first().is_some_and(|&u| u > 0x1f)).then(|| String::from_utf16_lossy(&units))
}

/// PE headers, section table and a `.cmdline` are read with these bounds: a UKI's headers sit
/// in its first pages, the PE format allows at most 96 sections, and no command line is longer
/// than the kernel's 2048 bytes.
const PE_HEADER_MAX: u64 = 64 * 1024;
const PE_SECTIONS_MAX: usize = 96;
const SECTION_MAX: usize = 4096;

/// The contents of section `name` (`.cmdline`) of the PE file `f`, or None when it has none.
/// Only the DOS header's `e_lfanew`, the COFF header and the section table are read: no
/// checksum or signature (the firmware checks those when it loads the file).
pub fn pe_section<R: std::io::Read + std::io::Seek>(
    f: &mut R,
    name: &str,
) -> Result<Option<Vec<u8>>, String> {
    use std::io::SeekFrom;
    let mut read_at = |at: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
        f.read_exact(&mut buf).map_err(|e| format!("{len} bytes at {at}: {e} (truncated?)"))?;
        Ok(buf)
    };
    let dos = read_at(0, 64)?;
    if &dos[0..2] != b"MZ" {
        return Err("not a PE file (no MZ header)".into());
    }
    let pe = u32::from_le_bytes(dos[60..64].try_into().expect("4 bytes")) as u64;
    if pe > PE_HEADER_MAX {
        return Err(format!("PE header at {pe}, past the first {PE_HEADER_MAX} bytes"));
    }
    let coff = read_at(pe, 24)?;
    if &coff[0..4] != b"PE\0\0" {
        return Err("not a PE file (no PE signature)".into());
    }
    let sections = u16::from_le_bytes([coff[6], coff[7]]) as usize;
    let optional = u16::from_le_bytes([coff[20], coff[21]]) as u64;
    if sections > PE_SECTIONS_MAX {
        return Err(format!("{sections} sections, more than the format's {PE_SECTIONS_MAX}"));
    }
    let table = read_at(pe + 24 + optional, 40 * sections)?;
    for s in table.chunks(40) {
        let end = s[..8].iter().position(|&b| b == 0).unwrap_or(8);
        if &s[..end] != name.as_bytes() {
            continue;
        }
        let u32_at = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().expect("4 bytes"));
        let (virtual_size, raw_size, raw_at) = (u32_at(8) as usize, u32_at(16) as usize, u32_at(20) as u64);
        // The raw data is padded to the file alignment; the virtual size is the contents'.
        let len = if virtual_size == 0 { raw_size } else { virtual_size.min(raw_size) };
        if len > SECTION_MAX {
            return Err(format!("section {name} holds {len} bytes, more than {SECTION_MAX}"));
        }
        return read_at(raw_at, len).map(Some);
    }
    Ok(None)
}

/// A UKI's built-in command line: its `.cmdline` section, as text without trailing NULs and
/// white space.
pub fn uki_cmdline(path: &Path) -> Result<String, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw = pe_section(&mut f, ".cmdline")
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{} has no .cmdline section", path.display()))?;
    let text = String::from_utf8(raw).map_err(|_| format!("{}: .cmdline is not UTF-8", path.display()))?;
    Ok(text.trim_end_matches(['\0', '\n', ' ']).to_string())
}

/// Where a slot's UKI is read from: a file (the unit tests'), or the slot's BOOT partition,
/// mounted read-only at [`ESP_MOUNT`] for the time of one read.
#[derive(Debug, Clone)]
pub enum UkiAt {
    #[cfg_attr(not(test), allow(dead_code))]
    File(PathBuf),
    Partition(PathBuf),
}

/// Where a BOOT partition is mounted while its UKI's command line is read (callers hold the
/// firmware's lock in `bootctl`, so one at a time).
pub const ESP_MOUNT: &str = "/run/berth/esp";

impl UkiAt {
    /// The UKI's own command line (its `.cmdline` section).
    pub fn own_cmdline(&self, slot: Slot) -> Result<String, String> {
        match self {
            UkiAt::File(p) => uki_cmdline(p),
            UkiAt::Partition(dev) => {
                let dir = Path::new(ESP_MOUNT);
                fs::create_dir_all(dir).map_err(|e| format!("{ESP_MOUNT}: {e}"))?;
                let flags = crate::sys::MS_RDONLY
                    | crate::sys::MS_NOSUID
                    | crate::sys::MS_NODEV
                    | crate::sys::MS_NOEXEC;
                crate::sys::mount(Some(&dev.to_string_lossy()), dir, Some("vfat"), flags, None)
                    .map_err(|e| format!("mounting {} at {ESP_MOUNT}: {e}", dev.display()))?;
                let rel = uki_path(slot).replace('\\', "/");
                let r = uki_cmdline(&dir.join(rel.trim_start_matches('/')));
                let _ = crate::sys::umount(dir, 0);
                r
            }
        }
    }
}

/// What the entries' optional data should say (stage 2, from `settings.boot`).
#[derive(Debug, Clone)]
pub struct NextCmdline {
    pub boot: crate::settings::boot::Boot,
    /// Slot A's and B's UKIs.
    pub ukis: [UkiAt; 2],
}

impl NextCmdline {
    /// The command line `slot`'s entry gives it: its UKI's own with the parameters.
    pub fn line(&self, slot: Slot) -> Result<String, String> {
        let base = self.ukis[slot as usize].own_cmdline(slot)?;
        crate::settings::boot::compose(&base, &self.boot)
    }
}

impl LoadOption {
    pub fn new(description: &str, hd: Hd, path: &str) -> LoadOption {
        LoadOption {
            active: true,
            description: description.into(),
            hd: Some(hd),
            path: Some(path.into()),
            optional_data: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut dp = Vec::new();
        if let Some(hd) = self.hd {
            // Media device path, hard drive: GPT partition by its unique GUID.
            dp.extend_from_slice(&[4, 1, 42, 0]);
            dp.extend_from_slice(&hd.number.to_le_bytes());
            dp.extend_from_slice(&hd.start_lba.to_le_bytes());
            dp.extend_from_slice(&hd.size_lba.to_le_bytes());
            dp.extend_from_slice(&hd.guid.0);
            dp.extend_from_slice(&[2, 2]); // GPT, GUID signature
        }
        if let Some(path) = &self.path {
            let name = utf16z(path);
            dp.extend_from_slice(&[4, 4]);
            dp.extend_from_slice(&((4 + name.len()) as u16).to_le_bytes());
            dp.extend_from_slice(&name);
        }
        dp.extend_from_slice(&[0x7f, 0xff, 4, 0]); // end of the whole path
        let attrs = if self.active { LOAD_OPTION_ACTIVE } else { 0 };
        let mut out = attrs.to_le_bytes().to_vec();
        out.extend_from_slice(&(dp.len() as u16).to_le_bytes());
        out.extend_from_slice(&utf16z(&self.description));
        out.extend_from_slice(&dp);
        out.extend_from_slice(&self.optional_data);
        out
    }

    /// Parse a load option; nodes other than HD and file path are skipped (not kept).
    pub fn decode(b: &[u8]) -> Result<LoadOption, String> {
        let u32_at = |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")));
        let attrs = u32_at(0).ok_or("shorter than its header")?;
        let dp_len = b
            .get(4..6)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
            .ok_or("shorter than its header")?;
        let mut i = 6;
        let mut units = Vec::new();
        loop {
            let u = b
                .get(i..i + 2)
                .map(|s| u16::from_le_bytes([s[0], s[1]]))
                .ok_or("description not terminated")?;
            i += 2;
            if u == 0 {
                break;
            }
            units.push(u);
        }
        let description = String::from_utf16_lossy(&units);
        let dp = b.get(i..i + dp_len).ok_or("device path longer than the option")?;
        let optional_data = b[i + dp_len..].to_vec();
        let (mut hd, mut path) = (None, None);
        let mut j = 0;
        while j + 4 <= dp.len() {
            let (ty, sub) = (dp[j], dp[j + 1]);
            let len = u16::from_le_bytes([dp[j + 2], dp[j + 3]]) as usize;
            if len < 4 || j + len > dp.len() {
                return Err(format!("device path node of length {len} at {j}"));
            }
            let node = &dp[j + 4..j + len];
            match (ty, sub) {
                (0x7f, 0xff) => break,
                (4, 1) if node.len() >= 38 => {
                    let mut guid = [0u8; 16];
                    guid.copy_from_slice(&node[20..36]);
                    hd = Some(Hd {
                        number: u32::from_le_bytes(node[0..4].try_into().expect("4 bytes")),
                        start_lba: u64::from_le_bytes(node[4..12].try_into().expect("8 bytes")),
                        size_lba: u64::from_le_bytes(node[12..20].try_into().expect("8 bytes")),
                        guid: Guid(guid),
                    });
                }
                (4, 4) => {
                    let units: Vec<u16> = node
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .take_while(|&u| u != 0)
                        .collect();
                    path = Some(String::from_utf16_lossy(&units));
                }
                _ => {}
            }
            j += len;
        }
        Ok(LoadOption { active: attrs & LOAD_OPTION_ACTIVE != 0, description, hd, path, optional_data })
    }
}

fn boot_var(n: u16) -> String {
    format!("Boot{n:04X}")
}

/// What [`UefiFirmware::apply`] found and did, for the log and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The Boot#### numbers of slot A's and B's entries.
    pub entries: [u16; 2],
    pub boot_order: Vec<u16>,
    pub boot_next: Option<u16>,
    /// Variables written (empty when the firmware already agreed).
    pub written: Vec<String>,
}

/// The UEFI backend's view of one disk: its variables and the two BOOT partitions.
pub struct UefiFirmware {
    pub vars: Vars,
    /// BOOT-A and BOOT-B.
    pub boot: [Hd; 2],
    /// The entries' command lines; None leaves their optional data as it is (stage 1).
    pub next_cmdline: Option<NextCmdline>,
}

impl UefiFirmware {
    /// Find the entries of A and B (creating what is missing), then make `BootOrder` and
    /// `BootNext` say what `slots` mean (module docs).
    pub fn apply(&self, slots: Slots) -> Result<Applied, Error> {
        let mut written = Vec::new();
        let mut entries = [0u16; 2];
        for (i, slot) in [Slot::A, Slot::B].into_iter().enumerate() {
            let mut want = LoadOption::new(&entry_name(slot), self.boot[i], &uki_path(slot));
            let found = self.find_entry(slot)?;
            want.optional_data = self.optional_data(slot, slots, found)?;
            let n = match found {
                Some(n) => n,
                None => self.free_entry(&entries[..i])?,
            };
            if self.vars.set(&boot_var(n), GLOBAL, &want.encode())? {
                written.push(boot_var(n));
            }
            entries[i] = n;
        }
        let order = self.vars.get_u16s("BootOrder")?;
        let mut good: Vec<(u8, u16)> = [Slot::A, Slot::B]
            .into_iter()
            .zip(entries)
            .filter(|(s, _)| slots[*s].bootable() && slots[*s].successful)
            .map(|(s, n)| (slots[s].priority, n))
            .collect();
        // Highest priority first; A before B on a tie, as stage 1's choice has it.
        good.sort_by_key(|g| std::cmp::Reverse(g.0));
        let mut new_order: Vec<u16> = good.iter().map(|(_, n)| *n).collect();
        new_order.extend(order.iter().copied().filter(|n| !entries.contains(n)));
        if self.vars.set_u16s("BootOrder", &new_order)? {
            written.push("BootOrder".into());
        }
        let trial = [Slot::A, Slot::B]
            .into_iter()
            .zip(entries)
            .filter(|(s, _)| slots[*s].bootable() && !slots[*s].successful)
            .max_by_key(|(s, _)| slots[*s].priority)
            .map(|(_, n)| n);
        let next = self.vars.get_u16s("BootNext")?.first().copied();
        match trial {
            Some(n) if self.vars.set_u16s("BootNext", &[n])? => written.push("BootNext".into()),
            Some(_) => {}
            // Only Berth's own BootNext is taken back; someone else's one-shot stays.
            None if next.is_some_and(|n| entries.contains(&n)) => {
                self.vars.delete("BootNext", GLOBAL)?;
                written.push("BootNext (deleted)".into());
            }
            None => {}
        }
        if !written.is_empty() {
            info!("firmware boot entries: wrote {}", written.join(", "));
        }
        Ok(Applied { entries, boot_order: new_order, boot_next: trial, written })
    }

    /// The optional data of `slot`'s entry (`found`: its number, if it exists): see the module
    /// docs.
    fn optional_data(&self, slot: Slot, slots: Slots, found: Option<u16>) -> Result<Vec<u8>, Error> {
        let Some(next) = &self.next_cmdline else {
            let now = match found {
                Some(n) => self.vars.get(&boot_var(n), GLOBAL)?.and_then(|raw| LoadOption::decode(&raw).ok()),
                None => None,
            };
            return Ok(now.map(|o| o.optional_data).unwrap_or_default());
        };
        if !next.boot.adds_anything() || self.vars.secure_boot() || !slots[slot].bootable() {
            return Ok(Vec::new());
        }
        let line = next.line(slot).map_err(|why| Error::Cmdline { slot, why })?;
        cmdline_data(&line).map_err(|why| Error::Cmdline { slot, why })
    }

    /// The command line each slot's entry gives the next boot of that slot, as the firmware
    /// holds it now: Ok(None) for the UKI's own (no optional data), or why it cannot be read.
    pub fn entry_cmdlines(&self) -> [Result<Option<String>, String>; 2] {
        [Slot::A, Slot::B].map(|slot| {
            let n = self.find_entry(slot).map_err(|e| e.to_string())?.ok_or("no entry yet")?;
            let raw =
                self.vars.get(&boot_var(n), GLOBAL).map_err(|e| e.to_string())?.ok_or("no entry yet")?;
            let opt = LoadOption::decode(&raw)?;
            Ok(data_cmdline(&opt.optional_data))
        })
    }

    /// The numbers of slot A's and B's entries (0xFFFF where one is missing).
    pub fn entries(&self) -> Result<[u16; 2], Error> {
        Ok([self.find_entry(Slot::A)?.unwrap_or(0xffff), self.find_entry(Slot::B)?.unwrap_or(0xffff)])
    }

    /// The number of the entry that boots `slot` from this disk, if there is one.
    fn find_entry(&self, slot: Slot) -> Result<Option<u16>, Error> {
        let hd = self.boot[slot as usize];
        for n in self.existing()? {
            let Some(raw) = self.vars.get(&boot_var(n), GLOBAL)? else { continue };
            let Ok(opt) = LoadOption::decode(&raw) else { continue };
            if opt.description == entry_name(slot) && opt.hd.is_some_and(|h| h.guid == hd.guid) {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// The Boot#### numbers that exist.
    fn existing(&self) -> Result<Vec<u16>, Error> {
        let rd = fs::read_dir(&self.vars.dir).map_err(|error| Error::Io { var: "Boot####".into(), error })?;
        let suffix = format!("-{GLOBAL}");
        let mut out: Vec<u16> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let hex = name.strip_suffix(&suffix)?.strip_prefix("Boot")?;
                (hex.len() == 4).then(|| u16::from_str_radix(hex, 16).ok()).flatten()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn free_entry(&self, taken: &[u16]) -> Result<u16, Error> {
        let used = self.existing()?;
        (0..=0xffffu16).find(|n| !used.contains(n) && !taken.contains(n)).ok_or(Error::NoFreeEntry)
    }

    /// The slot whose BOOT partition the running UKI was loaded from (systemd-stub's
    /// `LoaderDevicePartUUID`), if the firmware said.
    pub fn loaded_from(&self) -> Option<Slot> {
        let uuid = self.vars.get_string("LoaderDevicePartUUID", LOADER).ok()??;
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| self.boot[*s as usize].guid.to_string().eq_ignore_ascii_case(&uuid))
    }
}

/// Whether this boot came through UEFI and systemd-stub (a UKI), so the UEFI backend applies.
pub fn booted_as_uki(efivars: &Path) -> bool {
    efivars.join(format!("LoaderDevicePartUUID-{LOADER}")).exists()
}

/// State of both slots, for tests.
#[cfg(test)]
fn slots(a: (u8, u8, bool), b: (u8, u8, bool)) -> Slots {
    let s = |(priority, tries, successful)| SlotState { priority, tries, successful };
    Slots { a: s(a), b: s(b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid(s: &str) -> Guid {
        Guid::parse(s).unwrap()
    }

    fn firmware(name: &str) -> UefiFirmware {
        let dir = std::env::temp_dir().join(format!("berth-efivars-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        UefiFirmware {
            vars: Vars::new(dir),
            boot: [
                Hd {
                    number: 1,
                    start_lba: 2048,
                    size_lba: 65536,
                    guid: guid("11111111-2222-3333-4444-555555555555"),
                },
                Hd {
                    number: 4,
                    start_lba: 477184,
                    size_lba: 65536,
                    guid: guid("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"),
                },
            ],
            next_cmdline: None,
        }
    }

    #[test]
    fn load_options_round_trip_and_match_the_spec_layout() {
        let hd = Hd {
            number: 1,
            start_lba: 2048,
            size_lba: 65536,
            guid: guid("11111111-2222-3333-4444-555555555555"),
        };
        let opt = LoadOption::new("Berth A", hd, "\\EFI\\BERTH\\A.EFI");
        let b = opt.encode();
        assert_eq!(&b[0..4], &1u32.to_le_bytes(), "active");
        let dp_len = u16::from_le_bytes([b[4], b[5]]) as usize;
        // HD node (42) + file node (4 + 2 * 18) + end node (4).
        assert_eq!(dp_len, 42 + 4 + 2 * ("\\EFI\\BERTH\\A.EFI".len() + 1) + 4);
        assert_eq!(b.len(), 6 + 2 * 8 + dp_len, "no optional data");
        assert_eq!(LoadOption::decode(&b).unwrap(), opt);
        assert!(LoadOption::decode(&b[..10]).is_err());
    }

    #[test]
    fn first_boot_creates_entries_and_keeps_other_entries_after_ours() {
        let fw = firmware("first");
        // The firmware's own entries: a setup UI and a removable-media one, in its order.
        fw.vars
            .set(
                "Boot0000",
                GLOBAL,
                &LoadOption {
                    active: true,
                    description: "UiApp".into(),
                    hd: None,
                    path: None,
                    optional_data: vec![],
                }
                .encode(),
            )
            .unwrap();
        fw.vars
            .set(
                "Boot0001",
                GLOBAL,
                &LoadOption {
                    active: true,
                    description: "UEFI QEMU HARDDISK".into(),
                    hd: None,
                    path: None,
                    optional_data: vec![],
                }
                .encode(),
            )
            .unwrap();
        fw.vars.set_u16s("BootOrder", &[1, 0]).unwrap();
        let r = fw.apply(slots((1, 0, true), (0, 0, false))).unwrap();
        assert_eq!(r.entries, [2, 3]);
        assert_eq!(r.boot_order, vec![2, 1, 0], "A first, B (empty) not at all, the others kept");
        assert_eq!(r.boot_next, None);
        let a = LoadOption::decode(&fw.vars.get("Boot0002", GLOBAL).unwrap().unwrap()).unwrap();
        assert_eq!((a.description.as_str(), a.path.as_deref()), ("Berth A", Some("\\EFI\\BERTH\\A.EFI")));
        assert!(a.optional_data.is_empty());
        // Nothing changes the second time: no NVRAM writes.
        assert!(fw.apply(slots((1, 0, true), (0, 0, false))).unwrap().written.is_empty());
    }

    #[test]
    fn an_update_is_one_try_through_boot_next_and_good_slots_lead_boot_order() {
        let fw = firmware("trial");
        fw.apply(slots((1, 0, true), (0, 0, false))).unwrap();
        // activate: B on trial.
        let r = fw.apply(slots((1, 0, true), (2, 1, false))).unwrap();
        assert_eq!(r.boot_next, Some(r.entries[1]));
        assert_eq!(r.boot_order, vec![r.entries[0]], "the trial slot is not in BootOrder");
        // The firmware deleted BootNext and booted B; stage 1 used the try.
        fw.vars.delete("BootNext", GLOBAL).unwrap();
        let r = fw.apply(slots((1, 0, true), (2, 0, false))).unwrap();
        assert_eq!(
            (r.boot_next, r.boot_order.clone()),
            (None, vec![r.entries[0]]),
            "a failed trial falls back to A"
        );
        // B healthy and marked good: it leads.
        let r = fw.apply(slots((1, 0, true), (2, 0, true))).unwrap();
        assert_eq!(r.boot_order, vec![r.entries[1], r.entries[0]]);
        // deactivate before the reboot: BootNext taken back.
        fw.apply(slots((2, 0, true), (3, 1, false))).unwrap();
        assert!(fw.vars.get("BootNext", GLOBAL).unwrap().is_some());
        let r = fw.apply(slots((2, 0, true), (0, 0, false))).unwrap();
        assert!(fw.vars.get("BootNext", GLOBAL).unwrap().is_none());
        assert_eq!(r.boot_order, vec![r.entries[0]]);
    }

    #[test]
    fn someone_elses_boot_next_is_left_alone_and_entries_are_found_again() {
        let fw = firmware("others");
        let first = fw.apply(slots((1, 0, true), (0, 0, false))).unwrap();
        fw.vars.set_u16s("BootNext", &[0x42]).unwrap();
        let again = fw.apply(slots((1, 0, true), (0, 0, false))).unwrap();
        assert_eq!(again.entries, first.entries, "found by name and partition, not created twice");
        assert_eq!(fw.vars.get_u16s("BootNext").unwrap(), vec![0x42]);
    }

    #[test]
    fn loaded_from_matches_the_partition_guid() {
        let fw = firmware("loaded");
        let uuid: Vec<u8> =
            "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\0".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        fw.vars.set("LoaderDevicePartUUID", LOADER, &uuid).unwrap();
        assert_eq!(fw.loaded_from(), Some(Slot::B));
        assert!(booted_as_uki(&fw.vars.dir));
    }

    /// A minimal PE file as objcopy leaves a UKI: DOS header, PE signature, COFF header, an
    /// optional header of `opt` bytes, and the named sections' data after the table, each
    /// padded to 512 bytes (raw size) with its contents' length as its virtual size.
    pub(crate) fn pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let opt = 240usize;
        let mut f = vec![0u8; 0x80];
        f[0..2].copy_from_slice(b"MZ");
        f[60..64].copy_from_slice(&0x80u32.to_le_bytes());
        f.extend_from_slice(b"PE\0\0");
        let mut coff = [0u8; 20];
        coff[0..2].copy_from_slice(&0x8664u16.to_le_bytes());
        coff[2..4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        coff[16..18].copy_from_slice(&(opt as u16).to_le_bytes());
        f.extend_from_slice(&coff);
        f.extend(std::iter::repeat_n(0u8, opt));
        let mut at = (f.len() + 40 * sections.len()).div_ceil(512) * 512;
        let mut data = Vec::new();
        for (name, body) in sections {
            let mut h = [0u8; 40];
            h[..name.len()].copy_from_slice(name.as_bytes());
            let raw = body.len().div_ceil(512) * 512;
            h[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
            h[16..20].copy_from_slice(&(raw as u32).to_le_bytes());
            h[20..24].copy_from_slice(&(at as u32).to_le_bytes());
            f.extend_from_slice(&h);
            let mut padded = body.to_vec();
            padded.resize(raw, 0);
            data.push((at, padded));
            at += raw;
        }
        for (at, body) in data {
            f.resize(at, 0);
            f.extend_from_slice(&body);
        }
        f
    }

    #[test]
    fn pe_cmdline_section_is_found_and_bad_files_are_errors() {
        let line = b"console=ttyS0 panic=10 berth.slot=A berth.verity.roothash=ab12";
        let good = pe(&[(".osrel", b"ID=berth\n"), (".cmdline", line), (".linux", &[0x90; 700])]);
        let read = |b: &[u8]| pe_section(&mut std::io::Cursor::new(b.to_vec()), ".cmdline");
        assert_eq!(read(&good).unwrap().as_deref(), Some(&line[..]));
        assert_eq!(read(&pe(&[(".linux", b"x")])).unwrap(), None, "no .cmdline: None");
        // Truncated anywhere: in the headers, the section table, the .cmdline data (at 1024).
        for cut in [10, 0x82, 0x80 + 24 + 100, 0x80 + 24 + 240 + 50, 1024 + 30] {
            assert!(read(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut not_mz = good.clone();
        not_mz[0] = b'X';
        assert!(read(&not_mz).unwrap_err().contains("MZ"));
        let mut far = good.clone();
        far[60..64].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read(&far).unwrap_err().contains("past the first"));
        let mut many = good.clone();
        many[0x80 + 6..0x80 + 8].copy_from_slice(&1000u16.to_le_bytes());
        assert!(read(&many).unwrap_err().contains("sections"));
        let huge = pe(&[(".cmdline", &[b'a'; 5000])]);
        assert!(read(&huge).unwrap_err().contains("more than 4096"));
        // A UKI file: trailing NULs and newline dropped.
        let dir = crate::testing::TempDir::new("pe-uki");
        let path = dir.path().join("A.EFI");
        fs::write(&path, pe(&[(".cmdline", b"a b\n\0\0")])).unwrap();
        assert_eq!(uki_cmdline(&path).unwrap(), "a b");
        fs::write(&path, b"MZ").unwrap();
        assert!(uki_cmdline(&path).is_err());
    }

    #[test]
    fn optional_data_is_utf16_with_a_nul_and_only_printable_ascii() {
        let d = cmdline_data("a=1 b").unwrap();
        assert_eq!(d, b"a\0=\x001\0 \0b\0\0\0");
        assert_eq!(data_cmdline(&d).as_deref(), Some("a=1 b"));
        assert!(cmdline_data("").is_err() && cmdline_data(" a").is_err() && cmdline_data("é").is_err());
        assert!(cmdline_data("a\tb").is_err());
        assert_eq!(data_cmdline(&[]), None);
        assert_eq!(data_cmdline(&[1, 0, 0, 0]), None, "the stub ignores data starting below 0x20");
    }

    fn with_ukis(name: &str, params: serde_json::Value) -> (UefiFirmware, crate::testing::TempDir) {
        let dir = crate::testing::TempDir::new(name);
        let mut fw = firmware(name);
        let ukis = [Slot::A, Slot::B].map(|s| {
            let p = dir.path().join(format!("{s}.EFI"));
            let line = format!(
                "console=ttyS0 berth.slot={s} berth.verity.roothash={}",
                if s == Slot::A { "aa" } else { "bb" }
            );
            fs::write(&p, pe(&[(".cmdline", line.as_bytes())])).unwrap();
            UkiAt::File(p)
        });
        let boot = crate::settings::model::parse_for(&serde_json::json!({ "boot": params }), None)
            .unwrap()
            .boot
            .unwrap();
        fw.next_cmdline = Some(NextCmdline { boot, ukis });
        (fw, dir)
    }

    fn entry_data(fw: &UefiFirmware, n: u16) -> Vec<u8> {
        LoadOption::decode(&fw.vars.get(&boot_var(n), GLOBAL).unwrap().unwrap()).unwrap().optional_data
    }

    #[test]
    fn parameters_go_into_each_bootable_slots_entry_with_its_own_line() {
        let (fw, dir) = with_ukis(
            "params",
            serde_json::json!({"kernel-parameters": {"nosmt": [], "console": ["tty0"]},
                               "init-parameters": {"berth.health-timeout": ["600"]}}),
        );
        let r = fw.apply(slots((1, 0, true), (2, 1, false))).unwrap();
        let lines = fw.entry_cmdlines();
        assert_eq!(
            lines[0].as_ref().unwrap().as_deref(),
            Some("console=ttyS0 berth.slot=A berth.verity.roothash=aa console=tty0 nosmt -- berth.health-timeout=600")
        );
        assert!(lines[1]
            .as_ref()
            .unwrap()
            .as_deref()
            .unwrap()
            .contains("berth.slot=B berth.verity.roothash=bb console=tty0"));
        // A new UKI written into B (an update): B's entry follows it at the next transaction.
        let b = dir.path().join("B.EFI");
        fs::write(&b, pe(&[(".cmdline", b"console=ttyS0 berth.slot=B berth.verity.roothash=cc")])).unwrap();
        fw.apply(slots((1, 0, true), (3, 1, false))).unwrap();
        assert!(data_cmdline(&entry_data(&fw, r.entries[1]))
            .unwrap()
            .contains("roothash=cc console=tty0 nosmt"));
        // A slot that cannot boot gets no optional data, and its unreadable UKI is no error.
        fs::write(&b, b"half-written").unwrap();
        fw.apply(slots((1, 0, true), (0, 0, false))).unwrap();
        assert!(entry_data(&fw, r.entries[1]).is_empty());
        // ... but a bootable slot whose UKI cannot be read fails the transaction.
        let e = fw.apply(slots((1, 0, true), (2, 1, false))).unwrap_err();
        assert!(e.to_string().contains("slot B"), "{e}");
    }

    #[test]
    fn no_parameters_secure_boot_or_stage1_mean_no_new_optional_data() {
        let (mut fw, _dir) = with_ukis("noparams", serde_json::json!({"reboot-to-reconcile": true}));
        let r = fw.apply(slots((1, 0, true), (1, 0, true))).unwrap();
        assert!(entry_data(&fw, r.entries[0]).is_empty(), "nothing to add: the UKI's own line");
        // Stage 1 (no settings) keeps what stage 2 wrote.
        let (with, _d2) = with_ukis("keep", serde_json::json!({"kernel-parameters": {"nosmt": []}}));
        fw.next_cmdline = with.next_cmdline.clone();
        fw.apply(slots((1, 0, true), (1, 0, true))).unwrap();
        let data = entry_data(&fw, r.entries[0]);
        assert!(data_cmdline(&data).unwrap().ends_with("nosmt"));
        fw.next_cmdline = None;
        assert!(fw.apply(slots((1, 0, true), (1, 0, true))).unwrap().written.is_empty());
        assert_eq!(entry_data(&fw, r.entries[0]), data);
        // Secure Boot on: the stub would ignore it, so none is written.
        fw.next_cmdline = with.next_cmdline.clone();
        fw.vars.set("SecureBoot", GLOBAL, &[1]).unwrap();
        fw.apply(slots((1, 0, true), (1, 0, true))).unwrap();
        assert!(entry_data(&fw, r.entries[0]).is_empty());
    }
}
