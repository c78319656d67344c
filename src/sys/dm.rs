//! Device-mapper control through its ioctls on /dev/mapper/control, as libdevmapper does it,
//! without libdevmapper: create a device, load a one-target table, resume it, remove it.
//!
//! The ABI is `struct dm_ioctl` (version 4) from <linux/dm-ioctl.h>: a fixed 312-byte header,
//! followed (for table loads) by `struct dm_target_spec` records each with a NUL-terminated
//! parameter string, padded to 8 bytes.
//!
//! rustix has no device-mapper calls, so the requests are byte buffers laid out here and passed
//! through `rustix::ioctl` (the one `unsafe` block, in [`ioctl`]). Buffers rather than `repr(C)`
//! structs because a request is a header plus a variable-length tail whose size the header
//! states.

use std::fs::{File, OpenOptions};
use std::io;

use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};

const DM_CONTROL: &str = "/dev/mapper/control";
const HEADER_SIZE: usize = 312;
const SPEC_SIZE: usize = 40;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;

const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_TABLE_LOAD: u8 = 9;
const DM_TABLE_STATUS: u8 = 12;

const DM_READONLY_FLAG: u32 = 1 << 0;

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start_sector: u64,
    pub sectors: u64,
    pub kind: String,
    pub params: String,
}

/// _IOWR(0xfd, nr, struct dm_ioctl)
const fn request(nr: u8) -> Opcode {
    opcode::read_write::<[u8; HEADER_SIZE]>(0xfd, nr)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Build a request buffer: header with name/uuid/flags, then `payload`.
fn header(name: &str, uuid: &str, flags: u32, payload: &[u8], room: usize) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() >= DM_NAME_LEN || uuid.len() >= DM_UUID_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device-mapper name '{name}' or uuid '{uuid}' too long or empty"),
        ));
    }
    let size = HEADER_SIZE + payload.len().max(room);
    let mut buf = vec![0u8; size];
    put_u32(&mut buf, 0, 4); // version 4.0.0
    put_u32(&mut buf, 12, size as u32); // data_size
    put_u32(&mut buf, 16, HEADER_SIZE as u32); // data_start
    put_u32(&mut buf, 28, flags);
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    buf[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
    buf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
    Ok(buf)
}

/// Encode targets as consecutive dm_target_spec records.
fn encode_targets(targets: &[Target]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in targets {
        if t.kind.len() >= 16 || t.params.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad device-mapper target '{}'", t.kind),
            ));
        }
        let unpadded = SPEC_SIZE + t.params.len() + 1;
        let len = unpadded.div_ceil(8) * 8;
        let mut rec = vec![0u8; len];
        rec[0..8].copy_from_slice(&t.start_sector.to_ne_bytes());
        rec[8..16].copy_from_slice(&t.sectors.to_ne_bytes());
        put_u32(&mut rec, 20, len as u32); // next: offset to the following spec
        rec[24..24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
        rec[SPEC_SIZE..SPEC_SIZE + t.params.len()].copy_from_slice(t.params.as_bytes());
        out.extend_from_slice(&rec);
    }
    Ok(out)
}

fn control() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(DM_CONTROL)
        .map_err(|e| io::Error::new(e.kind(), format!("{DM_CONTROL}: {e}")))
}

/// One device-mapper request: a buffer made by [`header`]. Only [`ioctl`] builds one, after
/// checking that the buffer is at least `HEADER_SIZE` bytes and no shorter than its own
/// `data_size` field says.
struct Request<'a> {
    nr: u8,
    buf: &'a mut [u8],
}

// SAFETY: the opcode is the device-mapper command `nr` with the dm_ioctl size; the pointer is
// the start of `buf`, which the kernel reads and writes only up to the `data_size` the buffer
// states, and that fits in `buf` (checked by `ioctl` before it builds a Request); the output
// is read from `buf` afterwards by safe code, never through the pointer.
unsafe impl Ioctl for Request<'_> {
    type Output = ();
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        request(self.nr)
    }

    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.buf.as_mut_ptr().cast()
    }

    unsafe fn output_from_ptr(_: IoctlOutput, _: *mut core::ffi::c_void) -> rustix::io::Result<()> {
        Ok(())
    }
}

fn ioctl(ctl: &File, nr: u8, buf: &mut [u8], what: &str) -> io::Result<()> {
    if buf.len() < HEADER_SIZE || get_u32(buf, 12) as usize > buf.len() {
        let e = format!("device-mapper {what}: the request buffer is shorter than its header says");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    // SAFETY: `buf` is at least HEADER_SIZE bytes, and the data_size the kernel goes by is no
    // larger than the buffer (both checked above).
    unsafe { rustix::ioctl::ioctl(ctl, Request { nr, buf }) }.map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("device-mapper {what}: {e}"))
    })
}

/// Decode the kernel's huge_encode_dev() form of dm_ioctl.dev into (major, minor).
fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

/// Create device `name`, load `targets` (read-only when `read_only`), and resume it.
/// Returns the new block device's (major, minor). On failure the half-made device is removed.
pub fn create(name: &str, uuid: &str, targets: &[Target], read_only: bool) -> io::Result<(u32, u32)> {
    let ctl = control()?;
    let mut buf = header(name, uuid, 0, &[], 0)?;
    ioctl(&ctl, DM_DEV_CREATE, &mut buf, &format!("create {name}"))?;
    let dev = u64::from_ne_bytes(buf[40..48].try_into().expect("8 bytes"));

    let load = || -> io::Result<()> {
        let specs = encode_targets(targets)?;
        let flags = if read_only { DM_READONLY_FLAG } else { 0 };
        let mut buf = header(name, "", flags, &specs, 0)?;
        put_u32(&mut buf, 20, targets.len() as u32); // target_count
        ioctl(&ctl, DM_TABLE_LOAD, &mut buf, &format!("load table of {name}"))?;
        let mut buf = header(name, "", 0, &[], 0)?;
        ioctl(&ctl, DM_DEV_SUSPEND, &mut buf, &format!("resume {name}"))
    };
    if let Err(e) = load() {
        let _ = remove(name);
        return Err(e);
    }
    Ok(decode_dev(dev))
}

/// Remove device `name`.
pub fn remove(name: &str) -> io::Result<()> {
    let ctl = control()?;
    let mut buf = header(name, "", 0, &[], 0)?;
    ioctl(&ctl, DM_DEV_REMOVE, &mut buf, &format!("remove {name}"))
}

/// The status line of each target of device `name` (for dm-verity: "V" verified, "C" corrupt).
pub fn status(name: &str) -> io::Result<Vec<String>> {
    let ctl = control()?;
    let mut buf = header(name, "", 0, &[], 16 * 1024)?;
    ioctl(&ctl, DM_TABLE_STATUS, &mut buf, &format!("status of {name}"))?;
    let count = get_u32(&buf, 20) as usize;
    let start = get_u32(&buf, 16) as usize;
    let end = get_u32(&buf, 12) as usize;
    let mut out = Vec::new();
    let mut at = start;
    for _ in 0..count {
        if at + SPEC_SIZE > end.min(buf.len()) {
            break;
        }
        let next = get_u32(&buf, at + 20) as usize;
        let text = &buf[at + SPEC_SIZE..];
        let nul = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        out.push(String::from_utf8_lossy(&text[..nul]).into_owned());
        // For status replies `next` is an offset from the start of the data area.
        at = start + next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from <linux/dm-ioctl.h> as compiled on x86_64 and arm64.
        assert_eq!(request(DM_DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(DM_TABLE_LOAD), 0xc138_fd09);
        assert_eq!(request(DM_DEV_SUSPEND), 0xc138_fd06);
    }

    #[test]
    fn target_specs_are_padded_and_chained() {
        let t = Target { start_sector: 0, sectors: 8, kind: "verity".into(), params: "1 2 3".into() };
        let b = encode_targets(&[t.clone(), t]).unwrap();
        assert_eq!(b.len(), 2 * 48);
        assert_eq!(get_u32(&b, 20), 48);
        assert_eq!(&b[24..30], b"verity");
        assert_eq!(&b[40..46], b"1 2 3\0");
    }

    #[test]
    fn dev_numbers_decode() {
        // major 254, minor 0 and a minor above 255
        assert_eq!(decode_dev(254 << 8), (254, 0));
        assert_eq!(decode_dev((254 << 8) | 0x12 | (0x3 << 20)), (254, 0x312));
    }

    #[test]
    fn names_are_checked() {
        assert!(header("", "", 0, &[], 0).is_err());
        assert!(header(&"x".repeat(128), "", 0, &[], 0).is_err());
        assert!(header("root", "uuid", 0, &[], 0).is_ok());
    }
}
