//! dm-verity hash trees in the format the kernel's verity target and `veritysetup` share
//! (format version 1, a superblock in the first hash block, SHA-256, salt prepended).
//!
//! Layout of the hash device: block 0 is the superblock; then the tree's levels from the top
//! (the level just below the root) down to level 0, whose entries are the hashes of the data
//! blocks. Each entry is H(salt || block); each hash block is a run of 32-byte digests padded
//! with zeros. The root hash is H(salt || the single top-level block).
//! Limits: SHA-256 only, data and hash block sizes equal (4096 by default).

use std::fmt;
use std::io::{self, Read, Seek, Write};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

pub const DIGEST: usize = 32;

/// Everything needed to open a verity device, as stored in a slot's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VerityParams {
    pub algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    /// Offset of the first tree block in the hash device, in hash blocks (1: after the superblock).
    pub hash_start_block: u64,
    pub salt: String,
    pub root_hash: String,
}

impl VerityParams {
    /// The dm-verity table parameters, with devices given as "major:minor" or paths.
    /// Corruption restarts the machine, so a tampered root never runs and boot control can
    /// fall back to the other slot.
    pub fn table(&self, data_dev: &str, hash_dev: &str) -> String {
        format!(
            "1 {data_dev} {hash_dev} {} {} {} {} {} {} {} 1 restart_on_corruption",
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            self.algorithm,
            self.root_hash,
            self.salt,
        )
    }

    /// Length of the data device in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * self.data_block_size as u64 / 512
    }

    /// Check the fields are ones this module and the kernel agree on.
    pub fn validate(&self) -> Result<(), String> {
        if self.algorithm != "sha256" {
            return Err(format!("unsupported verity algorithm '{}'", self.algorithm));
        }
        for (name, v) in
            [("data-block-size", self.data_block_size), ("hash-block-size", self.hash_block_size)]
        {
            if !(512..=65536).contains(&v) || !v.is_power_of_two() {
                return Err(format!("verity {name} {v} is not a power of two in 512..65536"));
            }
        }
        if self.data_blocks == 0 {
            return Err("verity data-blocks is 0".into());
        }
        if self.root_hash.len() != 2 * DIGEST || hex::decode(&self.root_hash).is_err() {
            return Err(format!("verity root-hash '{}' is not 64 hex digits", self.root_hash));
        }
        if self.salt.len() > 512 || hex::decode(&self.salt).is_err() {
            return Err("verity salt is not hex (at most 256 bytes)".into());
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    Invalid(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Invalid(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

fn salted_hash(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(salt);
    ctx.update(block);
    let mut out = [0u8; DIGEST];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Number of blocks in each level, level 0 (data hashes) first. A single data block needs no
/// tree at all: its hash is the root (the kernel computes zero levels then).
fn level_sizes(data_blocks: u64, hash_block: u64) -> Vec<u64> {
    let per_block = hash_block / DIGEST as u64;
    let mut sizes = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(per_block);
        sizes.push(n);
    }
    sizes
}

fn superblock(data_blocks: u64, block: u32, salt: &[u8], uuid: [u8; 16]) -> Vec<u8> {
    let mut sb = vec![0u8; block as usize];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type (format) 1
    sb[16..32].copy_from_slice(&uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&block.to_le_bytes());
    sb[68..72].copy_from_slice(&block.to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Hash `data_len` bytes of `data` (a multiple of `block`) and write superblock and tree to
/// `hash_out` from its current start. Level 0 is computed in one streaming pass over the data.
pub fn format<R: Read, W: Write + Seek>(
    data: &mut R,
    data_len: u64,
    hash_out: &mut W,
    block: u32,
    salt: &[u8],
    uuid: [u8; 16],
) -> Result<VerityParams, Error> {
    let bs = block as u64;
    if data_len == 0 || !data_len.is_multiple_of(bs) {
        return Err(Error::Invalid(format!(
            "data size {data_len} is not a non-zero multiple of the {block}-byte block"
        )));
    }
    if salt.len() > 256 {
        return Err(Error::Invalid("salt longer than 256 bytes".into()));
    }
    let data_blocks = data_len / bs;

    // Level 0: the hash of every data block, streamed.
    let mut level0 = Vec::with_capacity((data_blocks as usize) * DIGEST);
    let mut buf = vec![0u8; block as usize];
    for _ in 0..data_blocks {
        data.read_exact(&mut buf)?;
        level0.extend_from_slice(&salted_hash(salt, &buf));
    }
    let (root, tree) = build_tree(level0, data_blocks, block, salt);
    hash_out.write_all(&superblock(data_blocks, block, salt, uuid))?;
    hash_out.write_all(&tree)?;
    hash_out.flush()?;
    Ok(VerityParams {
        algorithm: "sha256".into(),
        data_block_size: block,
        hash_block_size: block,
        data_blocks,
        hash_start_block: 1,
        salt: hex::encode(salt),
        root_hash: root,
    })
}

/// The tree above `level0` (the digests of the data blocks): the root hash (hex), and the
/// levels from the top down, each padded to whole blocks, as they follow the superblock.
pub fn build_tree(level0: Vec<u8>, data_blocks: u64, block: u32, salt: &[u8]) -> (String, Vec<u8>) {
    let bs = block as u64;
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut current = level0;
    // Each level is padded to whole blocks, then hashed block by block into the next.
    for size in level_sizes(data_blocks, bs) {
        current.resize((size * bs) as usize, 0);
        let next: Vec<u8> = current.chunks(block as usize).flat_map(|b| salted_hash(salt, b)).collect();
        levels.push(std::mem::replace(&mut current, next));
    }
    // After the top level (or with no levels, one data block), `current` is the root digest.
    let root = hex::encode(&current[..DIGEST]);
    (root, levels.iter().rev().flatten().copied().collect())
}

/// The level-0 digests of `data_len` bytes (whole blocks) that `read_at(offset, buf)` reads,
/// hashed by `threads` threads, each over its own contiguous share of the blocks.
pub fn level0_parallel<F>(
    read_at: F,
    data_len: u64,
    block: u32,
    salt: &[u8],
    threads: usize,
) -> io::Result<Vec<u8>>
where
    F: Fn(u64, &mut [u8]) -> io::Result<()> + Sync,
{
    let bs = block as u64;
    let blocks = data_len / bs;
    let per = blocks.div_ceil(threads.max(1) as u64);
    let read_at = &read_at;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1) as u64)
            .map(|t| {
                let (start, end) = ((t * per).min(blocks), ((t + 1) * per).min(blocks));
                s.spawn(move || -> io::Result<Vec<u8>> {
                    let mut out = Vec::with_capacity(((end - start) as usize) * DIGEST);
                    let mut buf = vec![0u8; (256 * bs) as usize];
                    let mut b = start;
                    while b < end {
                        let n = ((end - b) * bs).min(buf.len() as u64) as usize;
                        read_at(b * bs, &mut buf[..n])?;
                        for chunk in buf[..n].chunks(block as usize) {
                            out.extend_from_slice(&salted_hash(salt, chunk));
                        }
                        b += n as u64 / bs;
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::with_capacity((blocks as usize) * DIGEST);
        for w in workers {
            all.extend(w.join().map_err(|_| io::Error::other("a hashing thread panicked"))??);
        }
        Ok(all)
    })
}

/// Size in bytes of the hash device `format` writes for `data_blocks` blocks.
#[cfg(test)]
pub fn hash_size(data_blocks: u64, block: u32) -> u64 {
    (1 + level_sizes(data_blocks, block as u64).iter().sum::<u64>()) * block as u64
}

/// Recompute the tree of `data` and compare with `params` (a slow full check).
#[cfg(test)]
pub fn verify<R: Read + Seek>(data: &mut R, params: &VerityParams) -> Result<(), Error> {
    params.validate().map_err(Error::Invalid)?;
    let salt = hex::decode(&params.salt).unwrap_or_default();
    data.seek(io::SeekFrom::Start(0))?;
    let len = params.data_blocks * params.data_block_size as u64;
    let got = format(
        &mut data.take(len),
        len,
        &mut io::Cursor::new(Vec::new()),
        params.data_block_size,
        &salt,
        [0; 16],
    )?;
    if got.root_hash != params.root_hash {
        return Err(Error::Invalid(format!(
            "root hash mismatch: data gives {}, expected {}",
            got.root_hash, params.root_hash
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn build(data: &[u8]) -> (VerityParams, Vec<u8>) {
        let mut out = Cursor::new(Vec::new());
        let p = format(&mut Cursor::new(data), data.len() as u64, &mut out, 4096, b"salt", [1; 16]).unwrap();
        (p, out.into_inner())
    }

    #[test]
    fn parallel_level0_gives_the_same_tree() {
        let data: Vec<u8> = (0..(1000u32 * 4096)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (params, hash) = build(&data);
        for threads in [1, 2, 3, 7] {
            let read_at = |off: u64, buf: &mut [u8]| {
                buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                Ok(())
            };
            let level0 = level0_parallel(read_at, data.len() as u64, 4096, b"salt", threads).unwrap();
            let (root, tree) = build_tree(level0, 1000, 4096, b"salt");
            assert_eq!(root, params.root_hash, "{threads} threads");
            assert_eq!(&tree[..], &hash[4096..4096 + tree.len()], "{threads} threads");
        }
    }

    #[test]
    fn level_sizes_follow_the_kernel() {
        assert_eq!(level_sizes(1, 4096), Vec::<u64>::new());
        assert_eq!(level_sizes(2, 4096), vec![1]);
        assert_eq!(level_sizes(128, 4096), vec![1]);
        assert_eq!(level_sizes(129, 4096), vec![2, 1]);
        assert_eq!(level_sizes(128 * 128 + 1, 4096), vec![129, 2, 1]);
    }

    #[test]
    fn one_block_needs_no_tree() {
        let data = vec![0xa5u8; 4096];
        let (p, tree) = build(&data);
        assert_eq!(p.root_hash, hex::encode(salted_hash(b"salt", &data)));
        assert_eq!(tree.len(), 4096, "superblock only");
        assert_eq!(&tree[0..6], b"verity");
        assert_eq!(tree.len() as u64, hash_size(1, 4096));
    }

    #[test]
    fn two_blocks_make_one_level() {
        let data = vec![0xa5u8; 8192];
        let (p, tree) = build(&data);
        let leaf = salted_hash(b"salt", &data[..4096]);
        let mut top = vec![0u8; 4096];
        top[..32].copy_from_slice(&leaf);
        top[32..64].copy_from_slice(&leaf);
        assert_eq!(p.root_hash, hex::encode(salted_hash(b"salt", &top)));
        assert_eq!(&tree[4096..], &top[..]);
    }

    #[test]
    fn top_level_comes_first() {
        let data = vec![7u8; 4096 * 200];
        let (p, tree) = build(&data);
        assert_eq!(tree.len() as u64, hash_size(200, 4096));
        // layout: superblock, 1 top block, 2 leaf blocks
        assert_eq!(tree.len(), 4 * 4096);
        let leaf_block0 = &tree[2 * 4096..3 * 4096];
        assert_eq!(&tree[4096..4096 + 32], &salted_hash(b"salt", leaf_block0));
        assert_eq!(p.data_blocks, 200);
    }

    #[test]
    fn any_flipped_byte_changes_the_root() {
        let mut data = vec![3u8; 4096 * 3];
        let (a, _) = build(&data);
        data[4096 * 2 + 17] ^= 1;
        let (b, _) = build(&data);
        assert_ne!(a.root_hash, b.root_hash);
        assert!(verify(&mut Cursor::new(&data), &b).is_ok());
        assert!(verify(&mut Cursor::new(&data), &a).is_err());
    }

    #[test]
    fn rejects_partial_blocks_and_bad_params() {
        let mut out = Cursor::new(Vec::new());
        assert!(format(&mut Cursor::new(vec![0; 100]), 100, &mut out, 4096, b"", [0; 16]).is_err());
        let (mut p, _) = build(&[0; 4096]);
        assert!(p.validate().is_ok());
        p.root_hash = "zz".into();
        assert!(p.validate().is_err());
    }

    #[test]
    fn table_line_has_the_kernel_field_order() {
        let (p, _) = build(&[0; 8192]);
        let t = p.table("254:1", "254:2");
        let f: Vec<&str> = t.split(' ').collect();
        assert_eq!(&f[..8], &["1", "254:1", "254:2", "4096", "4096", "2", "1", "sha256"]);
        assert_eq!(f[9], hex::encode(b"salt"));
        assert_eq!(&f[10..], &["1", "restart_on_corruption"]);
    }
}
