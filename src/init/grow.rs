//! The writable partitions: DATA at /local (with /var bound from /local/var) and PRIVATE at
//! /var/lib/berth. On first boot DATA grows to the end of the disk: the GPT's backup moves to
//! the disk's end, DATA's entry is extended, the kernel is told (BLKPG), and the mounted ext4
//! is resized online, in a thread beside the rest of the boot (off the path to containerd: the
//! filesystem is usable at its old size meanwhile). Each step checks the current state first, so
//! a power cut half-way is finished on the next boot.
//!
//! Growing is never fatal: a disk whose layout does not allow it (a partition after DATA) or a
//! step that fails leaves DATA at its size, with a notice. A partition that cannot be mounted
//! is fatal on a boot on trial and replaced by memory (tmpfs) on a known-good slot, with a
//! notice (see src/init/mod.rs): the partition itself is left untouched for repair.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use log::info;

use super::{Ctx, LOCAL, PRIVATE};
use crate::boot::partitions::{self, PartInfo};
use crate::boot::{report, BootError};
use crate::disk::gpt::Gpt;
use crate::sys;

const MIB: u64 = 1 << 20;

/// Extend DATA's partition to the end of the disk if at least 1 MiB would be gained.
fn grow_partition(disk: &Path, sector: u64, data: &PartInfo) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", disk.display());
    let mut f = OpenOptions::new().read(true).write(true).open(disk).map_err(|e| err(&e))?;
    let size = sys::block_size_bytes(&f).map_err(|e| err(&e))?;
    let mut gpt = Gpt::read(&mut f, sector).map_err(|e| err(&e))?;
    let entry = gpt
        .partitions()
        .into_iter()
        .find(|p| p.number == data.number)
        .ok_or_else(|| format!("partition {} missing from the GPT", data.number))?;
    if let Some(after) = gpt.partitions().iter().find(|p| p.first_lba > entry.first_lba) {
        report::notice(format!(
            "BERTH-DATA is not the last partition ({} '{}' follows it); it keeps its size",
            after.number, after.name
        ));
        return Ok(());
    }
    gpt.relocate_backup(size);
    // End on a 1 MiB boundary, as partitioning tools do.
    let align = MIB / sector;
    let new_last = (gpt.last_usable + 1) / align * align - 1;
    if new_last <= entry.last_lba || (new_last - entry.last_lba) * sector < MIB {
        return Ok(());
    }
    gpt.set_last_lba(entry.number, new_last).map_err(|e| err(&e))?;
    gpt.write(&mut f).map_err(|e| err(&e))?;
    f.sync_all().map_err(|e| err(&e))?;
    let start = entry.first_lba * sector;
    let len = (new_last + 1 - entry.first_lba) * sector;
    sys::resize_partition(&f, entry.number, start, len)
        .map_err(|e| format!("BLKPG resize {}: {e}", data.dev))?;
    info!("grew {} from {} MiB to {} MiB", data.label, entry.size_bytes(sector) / MIB, len / MIB);
    Ok(())
}

/// (block count, block size) from an ext4 superblock on `dev`.
fn ext4_geometry(dev: &Path) -> Result<(u64, u64), String> {
    let mut f = File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return Err(format!("{} has no ext4 superblock", dev.display()));
    }
    let lo = u32::from_le_bytes(sb[4..8].try_into().expect("4 bytes")) as u64;
    let hi = u32::from_le_bytes(sb[0x150..0x154].try_into().expect("4 bytes")) as u64;
    let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().expect("4 bytes"));
    let blocks = if incompat & 0x80 != 0 { lo | (hi << 32) } else { lo };
    let bsize = 1024u64 << u32::from_le_bytes(sb[0x18..0x1c].try_into().expect("4 bytes"));
    Ok((blocks, bsize))
}

fn mount_ext4(dev: &PartInfo, target: &str) -> Result<(), BootError> {
    fs::create_dir_all(target).map_err(BootError::io("mkdir", target))?;
    sys::mount(
        Some(&dev.path().to_string_lossy()),
        Path::new(target),
        Some("ext4"),
        sys::MS_NOSUID | sys::MS_NODEV | sys::MS_RELATIME,
        None,
    )
    .map_err(BootError::io_on("mount", format!("{} ({}) on {target}", dev.path().display(), dev.label)))
}

/// Mount `dev` at `target`, or (known-good slot only) a tmpfs in its place.
fn mount_or_memory(ctx: &mut Ctx, dev: &PartInfo, target: &str, tmpfs_opts: &str) -> Result<bool, BootError> {
    match mount_ext4(dev, target) {
        Ok(()) => Ok(true),
        Err(e) => {
            ctx.degrade(
                e,
                &format!("{target} is in memory for this boot (what is written there is lost at reboot); {} is left as it is", dev.label),
            )?;
            sys::mount(
                Some("tmpfs"),
                Path::new(target),
                Some("tmpfs"),
                sys::MS_NOSUID | sys::MS_NODEV,
                Some(tmpfs_opts),
            )
            .map_err(BootError::io_on("mount", format!("tmpfs on {target}")))?;
            Ok(false)
        }
    }
}

/// Grow the mounted filesystem on `dev` at `target` to fill its partition.
fn grow_filesystem(dev: &PartInfo, target: &str) -> Result<(), String> {
    let (blocks, bsize) = ext4_geometry(&dev.path())?;
    let f = File::open(dev.path()).map_err(|e| format!("{}: {e}", dev.path().display()))?;
    let part_bytes = sys::block_size_bytes(&f).map_err(|e| format!("{}: {e}", dev.path().display()))?;
    let want = part_bytes / bsize;
    if want <= blocks || (want - blocks) * bsize < MIB {
        return Ok(());
    }
    let dir = File::open(target).map_err(|e| format!("{target}: {e}"))?;
    sys::ext4_resize(&dir, want).map_err(|e| format!("online resize of {target}: {e}"))?;
    info!("resized {target} to {} MiB", want * bsize / MIB);
    Ok(())
}

pub fn mount_data(ctx: &mut Ctx) -> Result<(), BootError> {
    let data = partitions::by_label(&ctx.parts, "BERTH-DATA")?.clone();
    let private = partitions::by_label(&ctx.parts, "BERTH-PRIVATE")?.clone();
    if let Err(e) = grow_partition(&ctx.handoff.disk, ctx.handoff.sector_size, &data) {
        report::notice(format!("growing BERTH-DATA: {e}; it keeps its size"));
    }
    if mount_or_memory(ctx, &data, LOCAL, "mode=0755,size=50%")? {
        // The online resize (first boot: new block groups written) runs beside the boot, off
        // the path to containerd: the filesystem is usable at its old size meanwhile.
        let spawned =
            std::thread::Builder::new().name("grow-data".into()).stack_size(64 * 1024).spawn(move || {
                let t = std::time::Instant::now();
                if let Err(e) = grow_filesystem(&data, LOCAL) {
                    report::notice(format!("growing the filesystem on BERTH-DATA: {e}; it keeps its size"));
                }
                info!("grow-data done in {} ms", t.elapsed().as_millis());
            });
        if let Err(e) = spawned {
            report::notice(format!(
                "growing the filesystem on BERTH-DATA: no thread ({e}); it keeps its size"
            ));
        }
    }
    let var = Path::new(LOCAL).join("var");
    fs::create_dir_all(var.join("lib/berth")).map_err(BootError::io("mkdir", var.join("lib/berth")))?;
    sys::mount(Some(&var.to_string_lossy()), Path::new("/var"), None, sys::MS_BIND, None)
        .map_err(BootError::io_on("bind", format!("{} on /var", var.display())))?;
    mount_or_memory(ctx, &private, PRIVATE, "mode=0700,size=16m").map(drop)
}
