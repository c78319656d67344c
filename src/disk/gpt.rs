//! GUID partition tables: read, change and write them back, primary and backup, with CRCs.
//!
//! Berth needs this at run time (boot control keeps its state in partition attribute bits;
//! stage 2 grows DATA to the end of the disk), so it works on any [`Device`]: a block device,
//! or an image file in tests. Only 512- and 4096-byte sectors with the usual 128-byte entries
//! are supported; anything else is rejected, never guessed at.
//!
//! Power cuts: a table is written as two copies, each durable before the other is touched
//! ([`Gpt::write`]): first the copy that readers do not depend on right now (the backup,
//! unless the table was read from the backup because the primary is damaged), its entry
//! array and header, then a barrier ([`Device::sync`], fsync); then the other copy, then a
//! barrier. At every instant one copy is complete and checksummed, so [`Gpt::read`] (primary
//! first, the backup if the primary fails its checks) always finds a table: the old one or
//! the new one, never a mix. The primary's entry array always goes to LBA 2, where its header
//! says it is, whichever copy the table was read from. [`Gpt::repair`] finds a copy that is
//! damaged or differs from the other (a write that was cut short) and rewrites both from the
//! one [`Gpt::read`] accepts; boot control runs it at every boot, before choosing a slot.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::crc32::crc32;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: u32 = 92;
const ENTRY_SIZE: u32 = 128;
/// Where the primary entry array is written (right after the primary header at LBA 1).
const PRIMARY_ENTRIES_LBA: u64 = 2;

/// What writing a table needs from a disk: positioned reads and writes, and a barrier.
pub trait Device: Read + Write + Seek {
    /// Make every write so far durable before any later one lands (fsync: for a block device
    /// the kernel also flushes the disk's volatile cache).
    fn sync(&mut self) -> io::Result<()>;
}

impl Device for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parse the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    #[cfg(test)]
    pub fn parse(s: &str) -> Option<Guid> {
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        // The first three fields are stored little-endian.
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Some(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
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
    /// (which copy, what part of it)
    BadCrc(&'static str, &'static str),
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::NoGpt(which) => write!(f, "no GPT signature in the {which} header"),
            Error::BadCrc(which, what) => write!(f, "GPT {which} {what} checksum does not match"),
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
    entry_count: u32,
    raw_entries: Vec<u8>,
    /// Which copy this table was read from (writes put the other copy first).
    pub from: TableCopy,
}

/// One of the two copies of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCopy {
    Primary,
    Backup,
}

impl TableCopy {
    fn name(self) -> &'static str {
        match self {
            TableCopy::Primary => "primary",
            TableCopy::Backup => "backup",
        }
    }
}

/// Both copies as found on the disk, each checked on its own.
#[derive(Debug)]
pub struct Copies {
    pub primary: Result<Gpt, Error>,
    /// Read where the primary says the backup is, or at the disk's last LBA if the primary
    /// is damaged.
    pub backup: Result<Gpt, Error>,
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
        check_sector(sector)?;
        match Self::read_copy(dev, sector, 1, TableCopy::Primary) {
            Ok(g) => Ok(g),
            Err(primary_err) => {
                let last = last_lba(dev, sector)?;
                Self::read_copy(dev, sector, last, TableCopy::Backup).map_err(|_| primary_err)
            }
        }
    }

    /// Read and check both copies, each on its own.
    pub fn read_copies<D: Read + Seek>(dev: &mut D, sector: u64) -> Result<Copies, Error> {
        check_sector(sector)?;
        let primary = Self::read_copy(dev, sector, 1, TableCopy::Primary);
        let backup_at = match &primary {
            Ok(p) => p.backup_lba,
            Err(_) => last_lba(dev, sector)?,
        };
        let backup = Self::read_copy(dev, sector, backup_at, TableCopy::Backup);
        Ok(Copies { primary, backup })
    }

    /// Make both copies whole and equal again: if one is damaged, or the two differ (a write
    /// was cut short between them), both are rewritten from the table [`Gpt::read`] accepts.
    /// Returns what was wrong, or None when nothing was.
    pub fn repair<D: Device>(dev: &mut D, sector: u64) -> Result<Option<String>, Error> {
        let Copies { primary, backup } = Self::read_copies(dev, sector)?;
        let (good, why) = match (primary, backup) {
            (Ok(p), Ok(b)) if p.same_table(&b) => return Ok(None),
            (Ok(p), Ok(_)) => (p, "the backup differs from the primary (a write was cut short)".to_string()),
            (Ok(p), Err(e)) => (p, format!("the backup copy is damaged ({e})")),
            (Err(e), Ok(b)) => (b, format!("the primary copy is damaged ({e})")),
            (Err(e), Err(_)) => return Err(e),
        };
        good.write(dev)?;
        Ok(Some(why))
    }

    /// Whether `other` describes the same table (same header fields and entries).
    fn same_table(&self, other: &Gpt) -> bool {
        (self.sector, self.disk_guid, self.first_usable, self.last_usable, self.backup_lba, self.entry_count)
            == (
                other.sector,
                other.disk_guid,
                other.first_usable,
                other.last_usable,
                other.backup_lba,
                other.entry_count,
            )
            && self.raw_entries == other.raw_entries
    }

    fn read_copy<D: Read + Seek>(dev: &mut D, sector: u64, lba: u64, which: TableCopy) -> Result<Gpt, Error> {
        let name = which.name();
        let h = read_at(dev, lba * sector, sector as usize)?;
        if &h[0..8] != SIGNATURE {
            return Err(Error::NoGpt(name));
        }
        let hsize = le32(&h, 12);
        if !(HEADER_SIZE..=sector as u32).contains(&hsize) {
            return Err(Error::Unsupported(format!("{name} header size {hsize}")));
        }
        let mut hcopy = h[..hsize as usize].to_vec();
        hcopy[16..20].fill(0);
        if crc32(&hcopy) != le32(&h, 16) {
            return Err(Error::BadCrc(name, "header"));
        }
        if le64(&h, 24) != lba {
            return Err(Error::Unsupported(format!(
                "the {name} header at LBA {lba} says it is at LBA {}",
                le64(&h, 24)
            )));
        }
        let entry_count = le32(&h, 80);
        let entry_size = le32(&h, 84);
        if entry_size != ENTRY_SIZE || entry_count == 0 || entry_count > 1024 {
            return Err(Error::Unsupported(format!("{entry_count} entries of {entry_size} bytes")));
        }
        let entries_lba = le64(&h, 72);
        let raw_entries = read_at(dev, entries_lba * sector, (entry_count * ENTRY_SIZE) as usize)?;
        if crc32(&raw_entries) != le32(&h, 88) {
            return Err(Error::BadCrc(name, "partition entry array"));
        }
        let backup_lba = match which {
            TableCopy::Primary => le64(&h, 32),
            TableCopy::Backup => lba,
        };
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&h[56..72]);
        let gpt = Gpt {
            sector,
            disk_guid: Guid(disk_guid),
            first_usable: le64(&h, 40),
            last_usable: le64(&h, 48),
            backup_lba,
            entry_count,
            raw_entries,
            from: which,
        };
        // Both copies' entry arrays must lie outside the usable area, or writing the table
        // back would overwrite partitions.
        let entry_sectors = gpt.entry_sectors();
        if gpt.first_usable < PRIMARY_ENTRIES_LBA + entry_sectors
            || gpt.last_usable < gpt.first_usable
            || gpt.last_usable + entry_sectors >= gpt.backup_lba
        {
            return Err(Error::Unsupported(format!(
                "{name} header: usable LBAs {}..={} overlap the entry arrays (backup header at LBA {})",
                gpt.first_usable, gpt.last_usable, gpt.backup_lba
            )));
        }
        Ok(gpt)
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
        h[88..92].copy_from_slice(&crc32(&self.raw_entries).to_le_bytes());
        let crc = crc32(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Write both copies, each made durable before the other is touched: the copy readers
    /// do not depend on now first (the backup; the primary when this table was read from the
    /// backup), then the other. So a power cut at any point leaves at least one intact copy,
    /// holding the old table or the new one. The primary's entries always go to LBA 2.
    pub fn write<D: Device>(&self, dev: &mut D) -> Result<(), Error> {
        let order = match self.from {
            TableCopy::Primary => [TableCopy::Backup, TableCopy::Primary],
            TableCopy::Backup => [TableCopy::Primary, TableCopy::Backup],
        };
        for which in order {
            self.write_copy(dev, which)?;
            dev.sync()?;
        }
        Ok(())
    }

    fn write_copy<D: Device>(&self, dev: &mut D, which: TableCopy) -> Result<(), Error> {
        let s = self.sector;
        let (header_lba, other_lba, entries_lba) = match which {
            TableCopy::Primary => (1, self.backup_lba, PRIMARY_ENTRIES_LBA),
            TableCopy::Backup => (self.backup_lba, 1, self.backup_lba - self.entry_sectors()),
        };
        dev.seek(SeekFrom::Start(entries_lba * s))?;
        dev.write_all(&self.raw_entries)?;
        dev.seek(SeekFrom::Start(header_lba * s))?;
        dev.write_all(&self.header_bytes(header_lba, other_lba, entries_lba))?;
        Ok(())
    }
}

fn check_sector(sector: u64) -> Result<(), Error> {
    if sector != 512 && sector != 4096 {
        return Err(Error::Unsupported(format!("sector size {sector}")));
    }
    Ok(())
}

fn last_lba<D: Seek>(dev: &mut D, sector: u64) -> Result<u64, Error> {
    let size = dev.seek(SeekFrom::End(0))?;
    if size < 3 * sector {
        return Err(Error::Unsupported(format!("a disk of {size} bytes")));
    }
    Ok(size / sector - 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use std::path::Path;
    use std::process::Command;

    impl Device for Cursor<Vec<u8>> {
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A table made by hand: boot partitions A and B and a data partition on a 4 MiB disk,
    /// 512-byte sectors; A has priority 1.
    pub(crate) fn sample_disk() -> Cursor<Vec<u8>> {
        let sector = 512u64;
        let disk_bytes = 4 << 20;
        let mut raw_entries = vec![0u8; 128 * 128];
        let ty = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        let parts = [
            ("BERTH-BOOT-A", 2048u64, 3071u64, 1u64 << 48),
            ("BERTH-BOOT-B", 3072, 4095, 0),
            ("BERTH-DATA", 4096, 6143, 0),
        ];
        for (i, (name, first, last, attrs)) in parts.iter().enumerate() {
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
            entry_count: 128,
            raw_entries,
            from: TableCopy::Primary,
        };
        let mut disk = Cursor::new(vec![0u8; disk_bytes as usize]);
        gpt.write(&mut disk).unwrap();
        disk
    }

    /// A disk image as `sgdisk` makes it (protective MBR, both copies), in a temp file:
    /// BERTH-BOOT-A (priority 1, successful) and BERTH-BOOT-B.
    fn sgdisk_image(name: &str) -> (std::path::PathBuf, Vec<u8>) {
        let path = std::env::temp_dir().join(format!("berth-gpt-{name}-{}.img", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let out = Command::new("sgdisk")
            .args([
                "-o",
                "-n",
                "1:0:+128K",
                "-c",
                "1:BERTH-BOOT-A",
                "-n",
                "2:0:+128K",
                "-c",
                "2:BERTH-BOOT-B",
            ])
            .args(["-A", "1:set:48", "-A", "1:set:56"])
            .arg(&path)
            .output()
            .expect("sgdisk (scripts/setup installs it)");
        assert!(out.status.success(), "sgdisk: {}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    /// `sgdisk -v` on `bytes` (written to `path`): Ok, or its complaint. sgdisk repairs a
    /// damaged copy in memory before verifying and only warns about it on stderr, so any
    /// warning counts as a problem too.
    fn sgdisk_verify(path: &Path, bytes: &[u8]) -> Result<(), String> {
        std::fs::write(path, bytes).unwrap();
        let out = Command::new("sgdisk").arg("-v").arg(path).output().expect("sgdisk");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let complaint = ["Warning", "Caution", "Problem", "ERROR", "rror"].iter().any(|w| text.contains(w));
        if out.status.success() && text.contains("No problems found") && !complaint {
            Ok(())
        } else {
            Err(text)
        }
    }

    fn attrs_of(gpt: &Gpt) -> Vec<(String, u64)> {
        gpt.partitions().into_iter().map(|p| (p.name, p.attributes)).collect()
    }

    /// Records the writes a table write makes, and the barriers between them, over an image.
    struct Recorder {
        disk: Cursor<Vec<u8>>,
        /// (barriers before it, offset, bytes)
        writes: Vec<(usize, u64, Vec<u8>)>,
        barriers: usize,
    }

    impl Read for Recorder {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.disk.read(buf)
        }
    }

    impl Seek for Recorder {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.disk.seek(pos)
        }
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let at = self.disk.position();
            self.writes.push((self.barriers, at, buf.to_vec()));
            self.disk.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Device for Recorder {
        fn sync(&mut self) -> io::Result<()> {
            self.barriers += 1;
            Ok(())
        }
    }

    /// Every disk a power cut can leave while `gpt` is written over `before`, as a disk with a
    /// volatile write cache sees it: what was written before the last completed barrier is
    /// on the disk; of the 512-byte sectors written since, any subset may have landed, and
    /// one more may be torn (its first 40 bytes new). Sectors whose bytes do not change are
    /// left out, so the enumeration is exhaustive.
    fn cut_states(before: &[u8], gpt: &Gpt) -> Vec<(String, Vec<u8>)> {
        let mut rec = Recorder { disk: Cursor::new(before.to_vec()), writes: Vec::new(), barriers: 0 };
        gpt.write(&mut rec).unwrap();
        assert_eq!(rec.barriers, 2, "one barrier after each copy");
        // Sector-sized units, tagged with the barriers before them.
        let units: Vec<(usize, usize, &[u8])> = rec
            .writes
            .iter()
            .flat_map(|(b, off, bytes)| {
                bytes.chunks(512).enumerate().map(move |(i, c)| (*b, *off as usize + 512 * i, c))
            })
            .collect();
        let apply = |disk: &mut Vec<u8>, u: &(usize, usize, &[u8]), len: usize| {
            disk[u.1..u.1 + len].copy_from_slice(&u.2[..len]);
        };
        let mut out = Vec::new();
        for epoch in 0..=rec.barriers {
            let mut base = before.to_vec();
            units.iter().filter(|u| u.0 < epoch).for_each(|u| apply(&mut base, u, u.2.len()));
            let open: Vec<_> =
                units.iter().filter(|u| u.0 == epoch && base[u.1..u.1 + u.2.len()] != *u.2).collect();
            assert!(open.len() <= 12, "{} changed sectors", open.len());
            for subset in 0u32..1 << open.len() {
                let mut d = base.clone();
                for (i, u) in open.iter().enumerate() {
                    if subset & (1 << i) != 0 {
                        apply(&mut d, u, u.2.len());
                    }
                }
                let name = format!("barrier {epoch}, sectors {subset:#b} of {} landed", open.len());
                for (i, u) in open.iter().enumerate().filter(|(i, _)| subset & (1 << i) == 0) {
                    let mut torn = d.clone();
                    apply(&mut torn, u, 40);
                    out.push((format!("{name}, sector {i} torn"), torn));
                }
                out.push((name, d));
            }
        }
        out
    }

    /// Check every state a power cut can leave while `new` is written over `before` (whose
    /// table, as read, is `old`): the reader accepts one copy, holding `old` or `new`; repair
    /// makes both copies whole and equal without changing what the reader sees; `sgdisk -v`
    /// finds no problem after the repair.
    fn check_cuts(name: &str, before: &[u8], old: &Gpt, new: &Gpt, img: &Path) {
        let states = cut_states(before, new);
        assert!(states.len() >= 16, "{} states", states.len());
        let mut verified = std::collections::HashSet::new();
        for (what, bytes) in states {
            let mut disk = Cursor::new(bytes);
            let read = Gpt::read(&mut disk, 512).unwrap_or_else(|e| panic!("{name}, {what}: no table: {e}"));
            let got = attrs_of(&read);
            assert!(got == attrs_of(old) || got == attrs_of(new), "{name}, {what}: a mixed table {got:?}");
            let repaired = Gpt::repair(&mut disk, 512).unwrap_or_else(|e| panic!("{name}, {what}: {e}"));
            let copies = Gpt::read_copies(&mut disk, 512).unwrap();
            let (p, b) = (copies.primary.unwrap(), copies.backup.unwrap());
            assert!(p.same_table(&b), "{name}, {what}: copies differ after repair ({repaired:?})");
            assert_eq!(attrs_of(&p), got, "{name}, {what}: repair changed what the reader sees");
            // Most states repair to the same few disks: verify each distinct one once.
            let d = disk.get_ref();
            if verified.insert([&d[..34 * 512], &d[d.len() - 33 * 512..]].concat()) {
                if let Err(e) = sgdisk_verify(img, d) {
                    panic!("{name}, {what}: after repair ({repaired:?}) sgdisk -v says:\n{e}");
                }
            }
        }
    }

    #[test]
    fn a_power_cut_at_any_point_of_a_write_leaves_one_valid_table() {
        let (img, before) = sgdisk_image("cut");
        sgdisk_verify(&img, &before).expect("the fresh image is clean");
        let old = Gpt::read(&mut Cursor::new(before.clone()), 512).unwrap();
        let mut new = old.clone();
        let b = new.by_name("BERTH-BOOT-B").unwrap();
        new.set_attributes(b.number, b.attributes | (2 << 48) | (1 << 52)).unwrap();
        check_cuts("write from the primary", &before, &old, &new, &img);

        // A table read from the backup (the primary header damaged): written primary first.
        let mut damaged = before.clone();
        damaged[512..1024].fill(0);
        let from_backup = Gpt::read(&mut Cursor::new(damaged.clone()), 512).unwrap();
        assert_eq!(from_backup.from, TableCopy::Backup);
        let mut new = from_backup.clone();
        new.set_attributes(b.number, b.attributes | (3 << 48) | (1 << 52)).unwrap();
        check_cuts("write from the backup", &damaged, &from_backup, &new, &img);
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn a_table_read_from_the_backup_is_written_back_as_two_independent_copies() {
        let (img, mut bytes) = sgdisk_image("fallback");
        bytes[512..1024].fill(0); // the primary header is gone
        let mut disk = Cursor::new(bytes);
        let mut gpt = Gpt::read(&mut disk, 512).unwrap();
        let b = gpt.by_name("BERTH-BOOT-B").unwrap();
        gpt.set_attributes(b.number, 5 << 48).unwrap();
        gpt.write(&mut disk).unwrap();
        let copies = Gpt::read_copies(&mut disk, 512).unwrap();
        let (p, bk) = (copies.primary.unwrap(), copies.backup.unwrap());
        assert!(p.same_table(&bk));
        assert_eq!(le64(&disk.get_ref()[512..1024], 72), PRIMARY_ENTRIES_LBA, "primary entries at LBA 2");
        sgdisk_verify(&img, disk.get_ref()).unwrap();
        let want = p.by_name("BERTH-BOOT-B").unwrap().attributes;
        assert_eq!(want, 5 << 48);
        // Either copy's entry array alone carries the table.
        let backup_entries = ((p.backup_lba - 32) * 512) as usize;
        for (what, at) in [("backup", backup_entries), ("primary", 1024)] {
            let mut d = disk.get_ref().clone();
            d[at..at + 16384].fill(0xee);
            let g =
                Gpt::read(&mut Cursor::new(d), 512).unwrap_or_else(|e| panic!("{what} entries lost: {e}"));
            assert_eq!(g.by_name("BERTH-BOOT-B").unwrap().attributes, want, "{what} entries lost");
        }
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn repair_rewrites_a_damaged_copy_from_the_good_one() {
        let (img, clean) = sgdisk_image("repair");
        let mut disk = Cursor::new(clean.clone());
        assert_eq!(Gpt::repair(&mut disk, 512).unwrap(), None, "a clean table needs nothing");
        assert_eq!(disk.get_ref(), &clean);
        let last = clean.len() - 512;
        for (what, at) in [
            ("primary header", 512),
            ("primary entries", 1024 + 5),
            ("backup header", last),
            ("backup entries", last - 512 * 32 + 7),
        ] {
            let mut d = clean.clone();
            d[at] ^= 0x55;
            assert!(sgdisk_verify(&img, &d).is_err(), "{what}: sgdisk -v sees no damage");
            let mut disk = Cursor::new(d);
            let why = Gpt::repair(&mut disk, 512).unwrap().unwrap_or_else(|| panic!("{what}: not noticed"));
            assert!(why.contains(what.split(' ').next().unwrap()), "{what}: {why}");
            sgdisk_verify(&img, disk.get_ref()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(Gpt::repair(&mut disk, 512).unwrap(), None, "{what}: repaired twice");
        }
        let mut d = clean.clone();
        d[512 + 8] ^= 1;
        d[last + 8] ^= 1;
        assert!(Gpt::repair(&mut Cursor::new(d), 512).is_err(), "nothing to repair from");
        std::fs::remove_file(&img).unwrap();
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
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].name, "BERTH-BOOT-A");
        assert_eq!(parts[0].attributes, 1 << 48);
        assert_eq!(parts[2].number, 3);
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
            Err(Error::BadCrc(..)) => {}
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
        gpt.set_last_lba(3, new_last).unwrap();
        assert!(gpt.set_last_lba(3, new_last + 1).is_err());
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
        assert!(gpt.set_attributes(4, 0).is_err());
    }
}
