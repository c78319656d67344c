//! Loading the repository and writing a version into the inactive slot.
//!
//! Each image target is streamed from tough (which checks its length and SHA-256 as the bytes
//! pass and fails the stream's end on a mismatch) through an lz4 frame decoder straight into
//! the slot's partition. After all three land, the slot is checked as the next boot will see
//! it: `slot.toml` on its BOOT partition must name the chosen version, variant and arch, and
//! the dm-verity tree recomputed from the ROOT partition must give the root hash in
//! `slot.toml` and match the tree on the HASH partition, byte for byte.
//!
//! Cancelling ([`Progress::cancel`]): both ends of the stream check the switch between two
//! chunks (the writer also every [`CANCEL_POLL`] while it waits for one), so a prepare stops
//! within one chunk of the request. A fetch blocked on a stalled server ends only when the
//! transport gives up on it (its read timeout); then the write stops too.

use std::error::Error as StdError;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;
use log::info;
use tough::{ExpirationEnforcement, IntoVec, Repository, RepositoryLoader, TargetName};
use url::Url;

use super::manifest::{Manifest, Update, MANIFEST};
use super::{Config, Error, Progress};
use crate::bootctl::{Slot, SlotMeta};
use crate::disk::verity;

/// A loaded, verified repository and the runtime its futures run on.
pub struct Repo {
    rt: tokio::runtime::Runtime,
    repo: Repository,
}

/// `e` and its causes, one after another (tough's errors keep the cause out of Display).
pub fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn base_url(s: &str, what: &str) -> Result<Url, String> {
    let with_slash = if s.ends_with('/') { s.to_string() } else { format!("{s}/") };
    Url::parse(&with_slash).map_err(|e| format!("settings.updates.{what} '{s}': {e}"))
}

impl Repo {
    pub fn load(
        root: &Path,
        datastore: &Path,
        metadata_url: &str,
        targets_url: &str,
        transport: super::transport::HttpTransport,
    ) -> Result<Repo, String> {
        let root_bytes =
            std::fs::read(root).map_err(|e| format!("trusted root metadata {}: {e}", root.display()))?;
        let md = base_url(metadata_url, "metadata-base-url")?;
        let tg = base_url(targets_url, "targets-base-url")?;
        std::fs::create_dir_all(datastore).map_err(|e| format!("{}: {e}", datastore.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| format!("starting the updater's runtime: {e}"))?;
        let loader = RepositoryLoader::new(&root_bytes, md.clone(), tg)
            .transport(transport)
            .datastore(datastore)
            .expiration_enforcement(ExpirationEnforcement::Safe);
        let repo = rt
            .block_on(loader.load())
            .map_err(|e| format!("update repository at {md} refused: {}", chain(&e)))?;
        Ok(Repo { rt, repo })
    }

    pub fn manifest(&self) -> Result<Manifest, String> {
        let name = TargetName::new(MANIFEST).map_err(|e| e.to_string())?;
        let bytes = self.rt.block_on(async {
            match self.repo.read_target(&name).await {
                Ok(Some(s)) => s.into_vec().await.map_err(|e| chain(&e)),
                Ok(None) => Err(format!("the repository has no {MANIFEST} target")),
                Err(e) => Err(chain(&e)),
            }
        })?;
        Manifest::parse(&bytes)
    }

    fn target_len(&self, name: &TargetName) -> Option<u64> {
        self.repo.targets().signed.targets.get(name).map(|t| t.length)
    }
}

/// How often a writer waiting for the next chunk looks at the cancel switch.
const CANCEL_POLL: Duration = Duration::from_millis(200);

const CANCELLED: &str = "cancelled";

/// The receiving end of a target stream that another thread fetches (and tough hashes), so
/// that fetching and hashing overlap with decompressing and writing.
struct ChannelReader<'a> {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
    cancel: &'a AtomicBool,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other(CANCELLED));
            }
            match self.rx.recv_timeout(CANCEL_POLL) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
                Ok(Ok(b)) => self.buf = b,
                Ok(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// Poll `stream` to its end on `rt`, sending each chunk on; stops when the receiver is gone.
fn pump<S: Stream<Item = tough::error::Result<Bytes>>>(
    rt: &tokio::runtime::Runtime,
    stream: S,
    tx: mpsc::SyncSender<Result<Bytes, String>>,
    progress: &Progress,
) {
    let mut stream = Box::pin(stream);
    loop {
        if progress.cancelled() {
            return;
        }
        let item = rt.block_on(std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)));
        let msg = match item {
            None => return,
            Some(Ok(b)) => {
                progress.done.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(b)
            }
            Some(Err(e)) => Err(chain(&e)),
        };
        let stop = msg.is_err();
        if tx.send(msg).is_err() || stop {
            return;
        }
    }
}

/// Writes into one partition of the disk: [offset, offset + len).
struct Region<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
    pos: u64,
    label: String,
}

impl Write for Region<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::other(format!(
                "the image is larger than {} ({} bytes)",
                self.label, self.len
            )));
        }
        self.file.write_all_at(buf, self.offset + self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Stream target `name` into `slot`'s `kind` partition; returns the bytes written.
fn write_image(
    repo: &Repo,
    disk: &File,
    cfg: &Config,
    slot: Slot,
    kind: &str,
    name: &str,
    progress: &Progress,
) -> Result<u64, String> {
    let (offset, len) = cfg.disk.region(slot, kind)?;
    let label = slot.label(kind);
    assert!(slot != cfg.active, "the updater never writes the active slot");
    let tname = TargetName::new(name).map_err(|e| format!("target name '{name}': {e}"))?;
    let stream = repo
        .rt
        .block_on(repo.repo.read_target(&tname))
        .map_err(|e| format!("{name}: {}", chain(&e)))?
        .ok_or_else(|| format!("the manifest names image '{name}', which the repository does not list"))?;
    let mut region = Region { file: disk, offset, len, pos: 0, label: label.clone() };
    let (tx, rx) = mpsc::sync_channel(32);
    std::thread::scope(|scope| {
        scope.spawn(|| pump(&repo.rt, stream, tx, progress));
        let mut reader = ChannelReader { rx, buf: Bytes::new(), cancel: &progress.cancel };
        let mut decoder = lz4_flex::frame::FrameDecoder::new(&mut reader);
        let mut out = io::BufWriter::with_capacity(1 << 20, &mut region);
        io::copy(&mut decoder, &mut out).map_err(|e| format!("{name} → {label}: {e}"))?;
        out.flush().map_err(|e| format!("{name} → {label}: {e}"))?;
        drop(out);
        drop(decoder);
        // Read the stream to its end: tough checks the length and hash there, and nothing
        // may follow the lz4 frame.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(|e| format!("{name}: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{name}: {} bytes of trailing data after the lz4 frame", rest.len()));
        }
        Ok(())
    })?;
    Ok(region.pos)
}

/// Write `update`'s images into `slot` and check what landed. Returns a short report;
/// [`Error::Cancelled`] if [`Progress::cancel`] was set meanwhile, else [`Error::Stage`].
pub fn write_slot(
    repo: &Repo,
    update: &Update,
    cfg: &Config,
    slot: Slot,
    progress: &Progress,
) -> Result<String, Error> {
    write_and_check(repo, update, cfg, slot, progress).map_err(|e| {
        if progress.cancelled() {
            let done = progress.done.load(Ordering::Relaxed);
            Error::Cancelled(format!(
                "stopped after {} of {} MiB",
                done >> 20,
                progress.total.load(Ordering::Relaxed) >> 20
            ))
        } else {
            Error::Stage(e)
        }
    })
}

fn write_and_check(
    repo: &Repo,
    update: &Update,
    cfg: &Config,
    slot: Slot,
    progress: &Progress,
) -> Result<String, String> {
    let t0 = Instant::now();
    let images =
        [("BOOT", &update.images.boot), ("ROOT", &update.images.root), ("HASH", &update.images.hash)];
    let mut total = 0;
    for (_, name) in &images {
        let n = TargetName::new(name.as_str()).map_err(|e| format!("target name '{name}': {e}"))?;
        total += repo.target_len(&n).ok_or_else(|| format!("image '{name}' is not in the repository"))?;
    }
    progress.total.store(total, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.disk.path)
        .map_err(|e| format!("{}: {e}", cfg.disk.path.display()))?;
    let mut written = 0;
    for (kind, name) in &images {
        if progress.cancelled() {
            return Err(CANCELLED.into());
        }
        progress.set_phase(&format!("writing {}", slot.label(kind)));
        written += write_image(repo, &disk, cfg, slot, kind, name, progress)?;
    }
    disk.sync_all().map_err(|e| format!("flushing {}: {e}", cfg.disk.path.display()))?;
    if progress.cancelled() {
        return Err(CANCELLED.into());
    }
    let wrote_s = t0.elapsed().as_secs_f64();
    progress.set_phase("verifying");
    let _ = crate::sys::drop_page_cache(&disk);
    let meta = check_slot(&disk, cfg, slot, update)?;
    info!(
        "slot {slot}: {written} bytes written in {wrote_s:.1} s, verified in {:.1} s (root hash {})",
        t0.elapsed().as_secs_f64() - wrote_s,
        meta.verity.root_hash
    );
    Ok(format!(
        "{written} bytes in {:.1} s; verity root hash {} verified",
        t0.elapsed().as_secs_f64(),
        &meta.verity.root_hash
    ))
}

/// Check the slot as the next boot will read it.
fn check_slot(disk: &File, cfg: &Config, slot: Slot, update: &Update) -> Result<SlotMeta, String> {
    let text = (cfg.read_slot_meta)(&cfg.disk, slot)?;
    let meta = SlotMeta::parse(&text).map_err(|e| format!("slot.toml in {}: {e}", slot.label("BOOT")))?;
    let want = (update.version.to_string(), update.variant.as_str(), update.arch.as_str());
    if (meta.version.as_str(), meta.variant.as_str(), meta.arch.as_str()) != (want.0.as_str(), want.1, want.2)
    {
        return Err(format!(
            "the images are version {} {} {}, but the manifest says {} {} {}",
            meta.version, meta.variant, meta.arch, want.0, want.1, want.2
        ));
    }
    let v = &meta.verity;
    let (root_off, root_len) = cfg.disk.region(slot, "ROOT")?;
    let (hash_off, hash_len) = cfg.disk.region(slot, "HASH")?;
    let data_len = v.data_blocks * v.data_block_size as u64;
    if data_len > root_len {
        return Err(format!(
            "slot.toml describes {data_len} bytes of root, more than {}",
            slot.label("ROOT")
        ));
    }
    let salt = hex::decode(&v.salt).map_err(|_| "slot.toml: verity salt is not hex")?;
    if v.data_block_size != v.hash_block_size {
        return Err("slot.toml: data and hash block sizes differ".into());
    }
    // Read back and hash on every core: the data blocks' digests are independent.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let read_at = |off: u64, buf: &mut [u8]| disk.read_exact_at(buf, root_off + off);
    let level0 = verity::level0_parallel(read_at, data_len, v.data_block_size, &salt, threads)
        .map_err(|e| format!("reading back {}: {e}", slot.label("ROOT")))?;
    let (root_hash, levels) = verity::build_tree(level0, v.data_blocks, v.data_block_size, &salt);
    if root_hash != v.root_hash {
        return Err(format!(
            "{} as written gives verity root hash {root_hash}, but slot.toml says {}",
            slot.label("ROOT"),
            v.root_hash
        ));
    }
    let start = v.hash_start_block * v.hash_block_size as u64;
    if start + levels.len() as u64 > hash_len {
        return Err(format!("the hash tree does not fit {}", slot.label("HASH")));
    }
    let mut landed = vec![0u8; levels.len()];
    disk.read_exact_at(&mut landed, hash_off + start)
        .map_err(|e| format!("reading back {}: {e}", slot.label("HASH")))?;
    if landed != levels {
        return Err(format!(
            "the hash tree on {} does not match the root it was built for",
            slot.label("HASH")
        ));
    }
    Ok(meta)
}
