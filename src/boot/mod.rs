//! Stage 1: `/init` in the initramfs.
//!
//! Mounts the API filesystems, reads the `berth.*` kernel arguments, finds the disk by its GPT
//! labels, asks boot control for a slot (using up a try if the slot is on trial), reads the
//! slot's metadata from its BOOT partition, opens dm-verity over ROOT+HASH with the
//! device-mapper ioctls, mounts the verified EROFS root read-only and switches into it,
//! exec'ing its `/sbin/init` (this same program, now verified). Each phase is logged with its
//! duration. Any error ends in a reboot so that boot control can fall back.

pub mod cmdline;
pub mod mounts;
pub mod partitions;
pub mod watchdog;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{error, info};
use serde::{Deserialize, Serialize};

use crate::bootctl::{BootAttempt, BootControl, GptBootControl, Slot, SlotMeta};
use crate::sys::{self, dm};
use cmdline::Cmdline;
use partitions::PartInfo;

pub const SYSROOT: &str = "/sysroot";
/// What stage 1 hands to stage 2, on the /run tmpfs that moves into the new root.
pub const HANDOFF: &str = "/run/berth/boot.toml";
pub const VERITY_NAME: &str = "root";

/// Everything stage 2 needs to know about how this boot went.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Handoff {
    pub slot: Slot,
    pub on_trial: bool,
    pub tries_left: u8,
    pub disk: PathBuf,
    pub sector_size: u64,
    pub version: String,
    pub variant: String,
    pub root_hash: String,
    pub stage1_ms: u64,
}

type Phase = (&'static str, fn(&mut Ctx) -> Result<(), String>);

#[derive(Default)]
struct Ctx {
    cmdline: Cmdline,
    parts: Vec<PartInfo>,
    disk: PathBuf,
    sector: u64,
    attempt: Option<BootAttempt>,
    meta: Option<SlotMeta>,
    started: Option<Instant>,
    /// Armed when the slot is on trial; open until the exec of stage 2 (which re-opens it).
    watchdog: Option<watchdog::Watchdog>,
}

const PHASES: &[Phase] = &[
    ("early-mounts", early_mounts),
    ("find-disk", find_disk),
    ("choose-slot", choose_slot),
    ("slot-metadata", read_slot_metadata),
    ("verity", open_verity),
    ("mount-root", mount_root),
    ("handoff", write_handoff),
];

/// Run stage 1. Returns only if the switch into the root failed; the caller reboots.
pub fn stage1() -> String {
    let mut ctx = Ctx { started: Some(Instant::now()), ..Default::default() };
    for (name, phase) in PHASES {
        let t = Instant::now();
        if let Err(e) = phase(&mut ctx) {
            return format!("stage 1 phase {name} failed: {e}");
        }
        info!("stage1 phase {name} done in {} us", t.elapsed().as_micros());
    }
    let e = switch_root();
    format!("stage 1 switch_root failed: {e}")
}

fn early_mounts(ctx: &mut Ctx) -> Result<(), String> {
    mounts::mount_all(mounts::EARLY).map_err(|e| e.to_string())?;
    crate::klog::reopen_kmsg();
    crate::init::console_stdio();
    // Our own log lines must not be rate-limited away.
    let _ = fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    ctx.cmdline = Cmdline::read();
    info!("stage1 start version={} kernel={}", crate::VERSION, sys::kernel_release());
    Ok(())
}

const LABELS: &[&str] = &[
    "BERTH-BOOT-A",
    "BERTH-ROOT-A",
    "BERTH-HASH-A",
    "BERTH-BOOT-B",
    "BERTH-ROOT-B",
    "BERTH-HASH-B",
    "BERTH-PRIVATE",
    "BERTH-DATA",
];

fn find_disk(ctx: &mut Ctx) -> Result<(), String> {
    let wait = Duration::from_secs(ctx.cmdline.get_u64("rootwait", 10));
    ctx.parts = partitions::wait_for(LABELS, ctx.cmdline.get("disk"), wait)?;
    let first = &ctx.parts[0];
    ctx.disk = first.disk_path();
    let f = fs::File::open(&ctx.disk).map_err(|e| format!("{}: {e}", ctx.disk.display()))?;
    ctx.sector = sys::logical_sector_size(&f).map_err(|e| format!("{}: {e}", ctx.disk.display()))? as u64;
    info!("disk {} (sector {} bytes, {} partitions)", ctx.disk.display(), ctx.sector, ctx.parts.len());
    Ok(())
}

fn choose_slot(ctx: &mut Ctx) -> Result<(), String> {
    let forced = match ctx.cmdline.get("slot") {
        Some(s) => Some(Slot::parse(s).ok_or_else(|| format!("berth.slot={s} is not A or B"))?),
        None => None,
    };
    let mut bc = GptBootControl::new(&ctx.disk, ctx.sector);
    let a = bc.begin_boot(forced).map_err(|e| e.to_string())?;
    info!(
        "boot control: slot {} (on trial: {}, tries left: {}{})",
        a.slot,
        a.on_trial,
        a.tries_left,
        if forced.is_some() { ", forced by berth.slot" } else { "" }
    );
    if a.on_trial {
        ctx.watchdog = watchdog::Watchdog::arm(ctx.cmdline.get_u64("watchdog-timeout", watchdog::TIMEOUT));
    }
    ctx.attempt = Some(a);
    Ok(())
}

fn slot(ctx: &Ctx) -> Slot {
    ctx.attempt.map(|a| a.slot).unwrap_or(Slot::A)
}

fn read_slot_metadata(ctx: &mut Ctx) -> Result<(), String> {
    let boot = partitions::by_label(&ctx.parts, &slot(ctx).label("BOOT"))?;
    let text = partitions::with_boot_mounted(boot, |dir| fs::read_to_string(dir.join(SlotMeta::FILE)))?
        .map_err(|e| format!("{} on {}: {e}", SlotMeta::FILE, boot.label))?;
    let meta = SlotMeta::parse(&text).map_err(|e| format!("{} on {}: {e}", SlotMeta::FILE, boot.label))?;
    if let Some(want) = ctx.cmdline.get("verity.roothash") {
        if want != meta.verity.root_hash {
            return Err(format!(
                "slot {} root hash {} is not the one the kernel command line requires ({want})",
                slot(ctx),
                meta.verity.root_hash
            ));
        }
    }
    info!("slot {} is version {} ({} {})", slot(ctx), meta.version, meta.variant, meta.arch);
    ctx.meta = Some(meta);
    Ok(())
}

fn open_verity(ctx: &mut Ctx) -> Result<(), String> {
    let meta = ctx.meta.as_ref().ok_or("no slot metadata")?;
    let root = partitions::by_label(&ctx.parts, &slot(ctx).label("ROOT"))?;
    let hash = partitions::by_label(&ctx.parts, &slot(ctx).label("HASH"))?;
    let target = dm::Target {
        start_sector: 0,
        sectors: meta.verity.data_sectors(),
        kind: "verity".into(),
        params: meta.verity.table(&root.majmin(), &hash.majmin()),
    };
    let uuid = format!("BERTH-VERITY-{}-{}", slot(ctx), &meta.verity.root_hash[..16]);
    let (major, minor) = dm::create(VERITY_NAME, &uuid, &[target], true).map_err(|e| e.to_string())?;
    fs::create_dir_all("/dev/mapper").map_err(|e| format!("mkdir /dev/mapper: {e}"))?;
    let node = Path::new("/dev/mapper").join(VERITY_NAME);
    let _ = fs::remove_file(&node);
    sys::mknod_block(&node, major, minor, 0o600).map_err(|e| format!("mknod {}: {e}", node.display()))?;
    info!("dm-verity {} over {} + {} as {major}:{minor}", node.display(), root.dev, hash.dev);
    Ok(())
}

fn mount_root(_ctx: &mut Ctx) -> Result<(), String> {
    fs::create_dir_all(SYSROOT).map_err(|e| e.to_string())?;
    let dev = format!("/dev/mapper/{VERITY_NAME}");
    sys::mount(Some(&dev), Path::new(SYSROOT), Some("erofs"), sys::MS_RDONLY, None)
        .map_err(|e| format!("mount {dev} (erofs) on {SYSROOT}: {e}"))?;
    let init = Path::new(SYSROOT).join("sbin/init");
    if !init.exists() {
        return Err(format!("{} does not exist in the root filesystem", init.display()));
    }
    Ok(())
}

fn write_handoff(ctx: &mut Ctx) -> Result<(), String> {
    let meta = ctx.meta.as_ref().ok_or("no slot metadata")?;
    let a = ctx.attempt.ok_or("no boot attempt")?;
    let h = Handoff {
        slot: a.slot,
        on_trial: a.on_trial,
        tries_left: a.tries_left,
        disk: ctx.disk.clone(),
        sector_size: ctx.sector,
        version: meta.version.clone(),
        variant: meta.variant.clone(),
        root_hash: meta.verity.root_hash.clone(),
        stage1_ms: ctx.started.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0),
    };
    let text = toml::to_string(&h).map_err(|e| e.to_string())?;
    fs::write(HANDOFF, text).map_err(|e| format!("{HANDOFF}: {e}"))
}

/// Delete the initramfs contents (they would otherwise pin memory forever), skipping anything
/// on another filesystem: the new root and the moved mounts.
fn clean_initramfs(dir: &Path, root_dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != root_dev {
            continue;
        }
        if md.is_dir() {
            clean_initramfs(&p, root_dev);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Move the API filesystems into the new root, make it `/` and exec its init.
fn switch_root() -> std::io::Error {
    for m in ["/proc", "/sys", "/dev", "/run"] {
        let target = PathBuf::from(SYSROOT).join(&m[1..]);
        if let Err(e) = sys::mount(Some(m), &target, None, sys::MS_MOVE, None) {
            return std::io::Error::new(e.kind(), format!("move {m} to {}: {e}", target.display()));
        }
    }
    let root_dev = fs::metadata("/").map(|m| m.dev()).unwrap_or(0);
    clean_initramfs(Path::new("/"), root_dev);
    let steps = || -> std::io::Result<()> {
        std::env::set_current_dir(SYSROOT)?;
        sys::mount(Some("."), Path::new("/"), None, sys::MS_MOVE, None)?;
        sys::chroot(Path::new("."))?;
        std::env::set_current_dir("/")
    };
    if let Err(e) = steps() {
        return e;
    }
    info!("switching to the verified root");
    sys::exec(Path::new("/sbin/init"), &["/sbin/init"])
}

/// Fatal error before the boot was marked good: log, give the console a moment, reboot.
pub fn fail_and_reboot(what: &str) -> ! {
    error!("FATAL: {what}");
    error!("rebooting so that boot control can fall back");
    sys::sync();
    std::thread::sleep(Duration::from_millis(500));
    let e = sys::reboot(sys::RebootMode::Restart);
    error!("reboot failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
