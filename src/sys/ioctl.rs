//! Block-device, filesystem and watchdog ioctls.
//!
//! BLKSSZGET and EXT4_IOC_RESIZE_FS have safe wrappers in rustix and use them. BLKGETSIZE64,
//! BLKPG and WDIOC_SETTIMEOUT do not: they go through `rustix::ioctl`, with the request number
//! computed from the argument's type as the kernel's `_IO*` macros do (the tests check the
//! numbers against the kernel headers' values).

use std::fs::File;
use std::io;

use rustix::ioctl::{self, opcode, Getter, Opcode, Updater};

/// BLKGETSIZE64 = _IOR(0x12, 114, size_t); the kernel writes a u64 (size_t on 64-bit targets).
const BLKGETSIZE64: Opcode = opcode::read::<u64>(0x12, 114);
/// BLKPG = _IO(0x12, 105): the argument's layout is told by its `op` and `datalen` fields.
const BLKPG: Opcode = opcode::none(0x12, 105);
/// WDIOC_SETTIMEOUT = _IOWR('W', 6, int).
const WDIOC_SETTIMEOUT: Opcode = opcode::read_write::<libc::c_int>(b'W', 6);

const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

/// Size in bytes of a block device (BLKGETSIZE64).
pub fn block_size_bytes(dev: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes exactly one u64, the Getter's output type, and nothing else.
    Ok(unsafe { ioctl::ioctl(dev, Getter::<BLKGETSIZE64, u64>::new()) }?)
}

/// Logical sector size of a block device (BLKSSZGET).
pub fn logical_sector_size(dev: &File) -> io::Result<u32> {
    Ok(rustix::fs::ioctl_blksszget(dev)?)
}

/// `struct blkpg_partition` from <linux/blkpg.h>.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg` from <linux/blkpg.h>.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut core::ffi::c_void,
}

/// Tell the kernel that partition `pno` of the whole-disk device `disk` now spans
/// `start..start+length` bytes (BLKPG_RESIZE_PARTITION); works while it is mounted.
pub fn resize_partition(disk: &File, pno: u32, start: u64, length: u64) -> io::Result<()> {
    let out_of_range = || io::Error::new(io::ErrorKind::InvalidInput, "partition bounds out of range");
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(|_| out_of_range())?,
        length: i64::try_from(length).map_err(|_| out_of_range())?,
        pno: libc::c_int::try_from(pno).map_err(|_| out_of_range())?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: `arg` is a live blkpg_ioctl_arg whose `data` points to `part`, a live
    // blkpg_partition of the `datalen` it states; both outlive the call, and the kernel only
    // reads them for BLKPG_RESIZE_PARTITION.
    Ok(unsafe { ioctl::ioctl(disk, Updater::<BLKPG, BlkpgIoctlArg>::new(&mut arg)) }?)
}

/// Grow a mounted ext4 filesystem to `blocks` filesystem blocks (online resize).
pub fn ext4_resize(mountpoint: &File, blocks: u64) -> io::Result<()> {
    Ok(rustix::fs::ext4_ioc_resize_fs(mountpoint, blocks)?)
}

/// WDIOC_SETTIMEOUT: set a watchdog's timeout in seconds; returns what the driver chose.
pub fn watchdog_set_timeout(dev: &File, secs: i32) -> io::Result<i32> {
    let mut t: libc::c_int = secs;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes one int, which `t` is, and nothing else.
    unsafe { ioctl::ioctl(dev, Updater::<WDIOC_SETTIMEOUT, libc::c_int>::new(&mut t)) }?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values of the macros as compiled on x86_64 and arm64.
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKPG, 0x1269);
        assert_eq!(WDIOC_SETTIMEOUT, 0xc004_5706);
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
        assert_eq!(std::mem::size_of::<BlkpgIoctlArg>(), 24);
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = File::open("/proc/self/status").unwrap();
        assert!(block_size_bytes(&f).is_err());
        assert!(logical_sector_size(&f).is_err());
    }
}
