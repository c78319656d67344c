//! On-disk formats Berth reads and writes itself: GPT partition tables (boot control state,
//! growing DATA), dm-verity hash trees (image build), newc cpio archives (initramfs build).

pub mod cpio;
pub mod gpt;
pub mod verity;
