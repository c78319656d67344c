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

use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

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
    NothingBootable { a: SlotState, b: SlotState },
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
        }
    }
}

impl std::error::Error for Error {}

/// The operations every boot-control backend offers.
pub trait BootControl {
    fn state(&mut self, slot: Slot) -> Result<SlotState, Error>;
    fn set_state(&mut self, slot: Slot, state: SlotState) -> Result<(), Error>;

    /// Pick the slot to boot and use up one try if it is on trial.
    fn begin_boot(&mut self, forced: Option<Slot>) -> Result<BootAttempt, Error> {
        let a = self.state(Slot::A)?;
        let b = self.state(Slot::B)?;
        let slot = match forced {
            Some(s) => s,
            None => choose(a, b).ok_or(Error::NothingBootable { a, b })?,
        };
        let mut st = if slot == Slot::A { a } else { b };
        let on_trial = !st.successful;
        if on_trial && st.tries > 0 {
            st.tries -= 1;
            self.set_state(slot, st)?;
        }
        Ok(BootAttempt { slot, on_trial, tries_left: st.tries })
    }

    /// Mark `slot` good: it stays bootable from now on.
    fn mark_successful(&mut self, slot: Slot) -> Result<bool, Error> {
        let mut st = self.state(slot)?;
        if st.successful && st.tries == 0 {
            return Ok(false);
        }
        st.successful = true;
        st.tries = 0;
        self.set_state(slot, st)?;
        Ok(true)
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

    fn read(&self, f: &mut File) -> Result<Gpt, Error> {
        Gpt::read(f, self.sector).map_err(|e| Error::Gpt(self.disk.clone(), e))
    }
}

impl BootControl for GptBootControl {
    fn state(&mut self, slot: Slot) -> Result<SlotState, Error> {
        let mut f = self.open(false)?;
        let gpt = self.read(&mut f)?;
        let label = slot.label("BOOT");
        let p = gpt.by_name(&label).ok_or(Error::MissingPartition(label))?;
        Ok(SlotState::from_attributes(p.attributes))
    }

    fn set_state(&mut self, slot: Slot, state: SlotState) -> Result<(), Error> {
        let mut f = self.open(true)?;
        let mut gpt = self.read(&mut f)?;
        let label = slot.label("BOOT");
        let p = gpt.by_name(&label).ok_or(Error::MissingPartition(label))?;
        let g = |e| Error::Gpt(self.disk.clone(), e);
        gpt.set_attributes(p.number, state.to_attributes(p.attributes)).map_err(g)?;
        gpt.write(&mut f).map_err(g)?;
        f.sync_all().map_err(|e| Error::Open(self.disk.clone(), e))
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

    struct Mem([SlotState; 2]);
    impl BootControl for Mem {
        fn state(&mut self, slot: Slot) -> Result<SlotState, Error> {
            Ok(self.0[slot as usize])
        }
        fn set_state(&mut self, slot: Slot, state: SlotState) -> Result<(), Error> {
            self.0[slot as usize] = state;
            Ok(())
        }
    }

    #[test]
    fn a_failing_update_rolls_back_by_itself() {
        let mut bc = Mem([st(1, 0, true), st(2, 1, false)]);
        let first = bc.begin_boot(None).unwrap();
        assert_eq!((first.slot, first.on_trial, first.tries_left), (Slot::B, true, 0));
        // B never marked successful: the next boot takes A.
        let second = bc.begin_boot(None).unwrap();
        assert_eq!((second.slot, second.on_trial), (Slot::A, false));
    }

    #[test]
    fn marking_success_keeps_the_slot() {
        let mut bc = Mem([st(1, 0, true), st(2, 1, false)]);
        bc.begin_boot(None).unwrap();
        assert!(bc.mark_successful(Slot::B).unwrap());
        assert!(!bc.mark_successful(Slot::B).unwrap());
        assert_eq!(bc.begin_boot(None).unwrap().slot, Slot::B);
    }

    #[test]
    fn gpt_backend_on_an_image() {
        let dir = std::env::temp_dir().join(format!("berth-bootctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, crate::disk::gpt::tests::sample_disk().into_inner()).unwrap();
        let mut bc = GptBootControl::new(&img, 512);
        assert_eq!(bc.state(Slot::A).unwrap(), st(1, 0, false));
        assert!(matches!(bc.state(Slot::B), Err(Error::MissingPartition(_))));
        bc.set_state(Slot::A, st(3, 2, true)).unwrap();
        assert_eq!(GptBootControl::new(&img, 512).state(Slot::A).unwrap(), st(3, 2, true));
        std::fs::remove_dir_all(&dir).unwrap();
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
