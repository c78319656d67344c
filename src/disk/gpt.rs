//! GUID partition tables: read, change and write them back, primary and backup, with CRCs.
//!
//! Berth needs this at run time (boot control keeps its state in partition attribute bits;
//! stage 2 grows DATA to the end of the disk), so it works on any `Read + Write + Seek`:
//! a block device, or an image file in tests. Only 512- and 4096-byte sectors with the
//! usual 128-byte entries are supported; anything else is rejected, never guessed at.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: u32 = 92;
const ENTRY_SIZE: u32 = 128;

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parse the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    #[cfg(test)]
    pub fn parse(s: &str) -> Option<Guid> {
        let digits: String = s.chars().filter(|&c| c != '-').collect();
        if s.len() != 36 {
            return None;
        }
        let mut b = [0u8; 16];
        hex::decode_to_slice(digits, &mut b).ok()?;
        // The first three fields are stored little-endian.
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Some(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first three fields are stored little-endian, the last two as they read.
        let le = |bytes: &[u8]| hex::encode(bytes.iter().rev().copied().collect::<Vec<u8>>());
        let b = &self.0;
        let (time_low, time_mid, time_hi) = (le(&b[0..4]), le(&b[4..6]), le(&b[6..8]));
        let (clock, node) = (hex::encode(&b[8..10]), hex::encode(&b[10..]));
        write!(f, "{time_low}-{time_mid}-{time_hi}-{clock}-{node}")
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number, as the kernel names it (vda1 ...).
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Partition {
    pub fn size_bytes(&self, sector: u64) -> u64 {
        (self.last_lba + 1 - self.first_lba) * sector
    }
}

#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    NoGpt(&'static str),
    BadCrc(&'static str),
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::NoGpt(which) => write!(f, "no GPT signature in the {which} header"),
            Error::BadCrc(what) => write!(f, "GPT {what} checksum does not match"),
            Error::Unsupported(why) => write!(f, "unsupported GPT: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// A parsed table. `entries` holds all slots (used or not) so writing it back is lossless.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub sector: u64,
    pub disk_guid: Guid,
    pub first_usable: u64,
    pub last_usable: u64,
    pub backup_lba: u64,
    entries_lba: u64,
    entry_count: u32,
    raw_entries: Vec<u8>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_at<D: Read + Seek>(dev: &mut D, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    dev.seek(SeekFrom::Start(offset))?;
    dev.read_exact(&mut buf)?;
    Ok(buf)
}

impl Gpt {
    /// Read the primary table, falling back to the backup if the primary is damaged.
    pub fn read<D: Read + Seek>(dev: &mut D, sector: u64) -> Result<Gpt, Error> {
        if sector != 512 && sector != 4096 {
            return Err(Error::Unsupported(format!("sector size {sector}")));
        }
        match Self::read_header(dev, sector, 1, "primary") {
            Ok(g) => Ok(g),
            Err(primary_err) => {
                let size = dev.seek(SeekFrom::End(0))?;
                let last = size / sector - 1;
                Self::read_header(dev, sector, last, "backup").map_err(|_| primary_err)
            }
        }
    }

    fn read_header<D: Read + Seek>(
        dev: &mut D,
        sector: u64,
        lba: u64,
        which: &'static str,
    ) -> Result<Gpt, Error> {
        let h = read_at(dev, lba * sector, sector as usize)?;
        if &h[0..8] != SIGNATURE {
            return Err(Error::NoGpt(which));
        }
        let hsize = le32(&h, 12);
        if !(HEADER_SIZE..=sector as u32).contains(&hsize) {
            return Err(Error::Unsupported(format!("header size {hsize}")));
        }
        let mut hcopy = h[..hsize as usize].to_vec();
        hcopy[16..20].fill(0);
        if crc32fast::hash(&hcopy) != le32(&h, 16) {
            return Err(Error::BadCrc("header"));
        }
        let entry_count = le32(&h, 80);
        let entry_size = le32(&h, 84);
        if entry_size != ENTRY_SIZE || entry_count == 0 || entry_count > 1024 {
            return Err(Error::Unsupported(format!("{entry_count} entries of {entry_size} bytes")));
        }
        let entries_lba = le64(&h, 72);
        let raw_entries = read_at(dev, entries_lba * sector, (entry_count * ENTRY_SIZE) as usize)?;
        if crc32fast::hash(&raw_entries) != le32(&h, 88) {
            return Err(Error::BadCrc("partition entry array"));
        }
        let backup_lba = if lba == 1 { le64(&h, 32) } else { lba };
        // Written back, the primary header always sits at LBA 1.
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&h[56..72]);
        Ok(Gpt {
            sector,
            disk_guid: Guid(disk_guid),
            first_usable: le64(&h, 40),
            last_usable: le64(&h, 48),
            backup_lba,
            entries_lba,
            entry_count,
            raw_entries,
        })
    }

    /// The used entries, in table order.
    pub fn partitions(&self) -> Vec<Partition> {
        (0..self.entry_count).filter_map(|i| self.entry(i)).collect()
    }

    fn entry(&self, i: u32) -> Option<Partition> {
        let e = &self.raw_entries[(i * ENTRY_SIZE) as usize..((i + 1) * ENTRY_SIZE) as usize];
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&e[0..16]);
        if type_guid == [0; 16] {
            return None;
        }
        let mut unique = [0u8; 16];
        unique.copy_from_slice(&e[16..32]);
        let units: Vec<u16> =
            e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        Some(Partition {
            number: i + 1,
            type_guid: Guid(type_guid),
            unique_guid: Guid(unique),
            first_lba: le64(e, 32),
            last_lba: le64(e, 40),
            attributes: le64(e, 48),
            name: String::from_utf16_lossy(&units),
        })
    }

    /// Find a used partition by its name.
    pub fn by_name(&self, name: &str) -> Option<Partition> {
        self.partitions().into_iter().find(|p| p.name == name)
    }

    /// Replace the attribute bits of partition `number`.
    pub fn set_attributes(&mut self, number: u32, attributes: u64) -> Result<(), Error> {
        let at = self.entry_offset(number)?;
        self.raw_entries[at + 48..at + 56].copy_from_slice(&attributes.to_le_bytes());
        Ok(())
    }

    /// Set the last LBA of partition `number` (it must stay within the usable area).
    pub fn set_last_lba(&mut self, number: u32, last_lba: u64) -> Result<(), Error> {
        let at = self.entry_offset(number)?;
        let first = le64(&self.raw_entries, at + 32);
        if last_lba < first || last_lba > self.last_usable {
            return Err(Error::Unsupported(format!(
                "partition {number} cannot end at LBA {last_lba} (usable up to {})",
                self.last_usable
            )));
        }
        self.raw_entries[at + 40..at + 48].copy_from_slice(&last_lba.to_le_bytes());
        Ok(())
    }

    fn entry_offset(&self, number: u32) -> Result<usize, Error> {
        if number == 0 || number > self.entry_count || self.entry(number - 1).is_none() {
            return Err(Error::Unsupported(format!("no partition {number}")));
        }
        Ok(((number - 1) * ENTRY_SIZE) as usize)
    }

    fn entry_sectors(&self) -> u64 {
        (self.entry_count as u64 * ENTRY_SIZE as u64).div_ceil(self.sector)
    }

    /// Move the backup table to the end of a disk of `disk_bytes` (after the disk grew) and
    /// extend the usable area to match.
    pub fn relocate_backup(&mut self, disk_bytes: u64) {
        let last = disk_bytes / self.sector - 1;
        self.backup_lba = last;
        self.last_usable = last - self.entry_sectors() - 1;
    }

    fn header_bytes(&self, this_lba: u64, other_lba: u64, entries_lba: u64) -> Vec<u8> {
        let mut h = vec![0u8; self.sector as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[24..32].copy_from_slice(&this_lba.to_le_bytes());
        h[32..40].copy_from_slice(&other_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.0);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&self.entry_count.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&self.raw_entries).to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Write both copies. The backup goes first, so a power cut leaves at least one intact
    /// table, and the primary (which readers prefer) only changes once the backup is on disk.
    pub fn write<D: Write + Seek>(&self, dev: &mut D) -> Result<(), Error> {
        let backup_entries = self.backup_lba - self.entry_sectors();
        let s = self.sector;
        dev.seek(SeekFrom::Start(backup_entries * s))?;
        dev.write_all(&self.raw_entries)?;
        dev.seek(SeekFrom::Start(self.backup_lba * s))?;
        dev.write_all(&self.header_bytes(self.backup_lba, 1, backup_entries))?;
        dev.flush()?;
        dev.seek(SeekFrom::Start(self.entries_lba * s))?;
        dev.write_all(&self.raw_entries)?;
        dev.seek(SeekFrom::Start(s))?;
        dev.write_all(&self.header_bytes(1, self.backup_lba, self.entries_lba))?;
        dev.flush()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A table made by hand: two partitions on a 4 MiB disk, 512-byte sectors.
    pub(crate) fn sample_disk() -> Cursor<Vec<u8>> {
        let sector = 512u64;
        let disk_bytes = 4 << 20;
        let mut raw_entries = vec![0u8; 128 * 128];
        let ty = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        for (i, (name, first, last, attrs)) in
            [("BERTH-BOOT-A", 2048u64, 4095u64, 1u64 << 48), ("BERTH-DATA", 4096, 6143, 0)].iter().enumerate()
        {
            let e = &mut raw_entries[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&ty.0);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            e[48..56].copy_from_slice(&attrs.to_le_bytes());
            for (j, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let last = disk_bytes / sector - 1;
        let gpt = Gpt {
            sector,
            disk_guid: Guid([7; 16]),
            first_usable: 34,
            last_usable: last - 33,
            backup_lba: last,
            entries_lba: 2,
            entry_count: 128,
            raw_entries,
        };
        let mut disk = Cursor::new(vec![0u8; disk_bytes as usize]);
        gpt.write(&mut disk).unwrap();
        disk
    }

    #[test]
    fn guid_text_round_trips() {
        let s = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let g = Guid::parse(s).unwrap();
        assert_eq!(g.0[0], 0x28);
        assert_eq!(g.to_string(), s);
        assert!(Guid::parse("nope").is_none());
        assert!(Guid::parse("c12a7328f81f11d2ba4b00a0c93ec93b").is_none());
    }

    #[test]
    fn reads_what_it_wrote() {
        let mut disk = sample_disk();
        let gpt = Gpt::read(&mut disk, 512).unwrap();
        let parts = gpt.partitions();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "BERTH-BOOT-A");
        assert_eq!(parts[0].attributes, 1 << 48);
        assert_eq!(parts[1].number, 2);
        assert_eq!(gpt.backup_lba, (4 << 20) / 512 - 1);
    }

    #[test]
    fn attribute_changes_persist_in_both_copies() {
        let mut disk = sample_disk();
        let mut gpt = Gpt::read(&mut disk, 512).unwrap();
        gpt.set_attributes(1, 0xabu64 << 48).unwrap();
        gpt.write(&mut disk).unwrap();
        // Destroy the primary header: the backup must carry the change.
        disk.get_mut()[512..520].fill(0);
        let gpt = Gpt::read(&mut disk, 512).unwrap();
        assert_eq!(gpt.by_name("BERTH-BOOT-A").unwrap().attributes, 0xab << 48);
    }

    #[test]
    fn corrupt_entries_are_detected() {
        let mut disk = sample_disk();
        disk.get_mut()[1024 + 60] ^= 1; // primary entry array
        let last = (4 << 20) / 512 - 1;
        let backup_entries = (last - 32) as usize * 512;
        disk.get_mut()[backup_entries + 60] ^= 1;
        match Gpt::read(&mut disk, 512) {
            Err(Error::BadCrc(_)) => {}
            other => panic!("expected a CRC error, got {other:?}"),
        }
    }

    #[test]
    fn grows_into_a_bigger_disk() {
        let mut disk = sample_disk();
        disk.get_mut().resize(8 << 20, 0);
        let mut gpt = Gpt::read(&mut disk, 512).unwrap();
        gpt.relocate_backup(8 << 20);
        let new_last = gpt.last_usable;
        gpt.set_last_lba(2, new_last).unwrap();
        assert!(gpt.set_last_lba(2, new_last + 1).is_err());
        gpt.write(&mut disk).unwrap();
        let gpt = Gpt::read(&mut disk, 512).unwrap();
        assert_eq!(gpt.backup_lba, (8 << 20) / 512 - 1);
        assert_eq!(gpt.by_name("BERTH-DATA").unwrap().last_lba, new_last);
    }

    #[test]
    fn rejects_unknown_partition_numbers() {
        let mut disk = sample_disk();
        let mut gpt = Gpt::read(&mut disk, 512).unwrap();
        assert!(gpt.set_attributes(0, 0).is_err());
        assert!(gpt.set_attributes(3, 0).is_err());
    }
}
