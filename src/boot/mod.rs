//! Stage 1: `/init` in the initramfs.
//!
//! Mounts the API filesystems, reads the `berth.*` kernel arguments, finds the disk by its GPT
//! labels, asks boot control for a slot (using up a try if the slot is on trial), reads the
//! slot's metadata from its BOOT partition, opens dm-verity over ROOT+HASH with the
//! device-mapper ioctls, mounts the verified EROFS root read-only and switches into it,
//! exec'ing its `/sbin/init` (this same program, now verified); from the mount on, a child
//! reads the programs the boot runs next into the page cache ([`prefetch`]). Each phase is
//! logged with its duration. Any error ends in a reboot so that boot control can fall back:
//! [`fail_and_reboot`] is bounded in time whatever the disks do, and if the reboot itself
//! fails, PID 1 exits, which the kernel turns into a panic and, with `panic=N` (set here if it
//! was 0), a reboot.

pub mod cmdline;
pub mod error;
pub mod mounts;
pub mod partitions;
mod prefetch;
pub mod report;
pub mod selinux;
pub mod watchdog;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::bootctl::rpi::{self, Bootloader};
use crate::bootctl::{self, BootAttempt, BootControl, GptBootControl, Slot, SlotMeta};
use crate::sys::{self, dm};
use cmdline::Cmdline;
pub use error::{BootError, Failure};
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
    /// Stage 1's phases, for the boot timeline.
    #[serde(default)]
    pub phases: Vec<report::PhaseTime>,
    /// How the slot was chosen: `uefi` (the firmware started the slot's UKI) or `direct` (a
    /// kernel handed over by a loader or QEMU; stage 1 chose).
    #[serde(default)]
    pub boot: String,
    #[serde(default)]
    pub secure_boot: bool,
    /// How SELinux runs (stage 1 loaded the policy).
    #[serde(default)]
    pub selinux: selinux::State,
    /// Stage 1's notices (e.g. a policy that did not load under `berth.selinux=permissive`),
    /// for `GET /boot`.
    #[serde(default)]
    pub notices: Vec<String>,
    /// The `BERTH-AUTOBOOT` partition (Raspberry Pi boots: `boot = "rpi"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoboot: Option<PathBuf>,
}

type Phase = (&'static str, fn(&mut Ctx) -> Result<(), BootError>);

struct Ctx {
    cmdline: Cmdline,
    parts: Vec<PartInfo>,
    disk: PathBuf,
    sector: u64,
    attempt: Option<BootAttempt>,
    meta: Option<SlotMeta>,
    started: Instant,
    /// Armed for every boot (unless `berth.watchdog=off`); open until the exec of stage 2,
    /// which opens it again and keeps it fed for the life of the system.
    watchdog: Option<watchdog::Watchdog>,
    /// The firmware booted with Secure Boot on (UEFI only).
    secure_boot: bool,
    selinux: selinux::State,
    /// The partition holding `autoboot.txt` (Raspberry Pi only).
    autoboot: Option<PathBuf>,
}

impl Ctx {
    /// The slot chosen by the choose-slot phase.
    fn attempt(&self) -> Result<BootAttempt, BootError> {
        self.attempt.ok_or(BootError::Order { needs: "the boot slot" })
    }

    fn slot(&self) -> Result<Slot, BootError> {
        self.attempt().map(|a| a.slot)
    }

    fn meta(&self) -> Result<&SlotMeta, BootError> {
        self.meta.as_ref().ok_or(BootError::Order { needs: "the slot metadata" })
    }

    fn part(&self, kind: &str) -> Result<&PartInfo, BootError> {
        partitions::by_label(&self.parts, &self.slot()?.label(kind))
    }
}

const PHASES: &[Phase] = &[
    ("early-mounts", early_mounts),
    ("find-disk", find_disk),
    ("choose-slot", choose_slot),
    ("slot-metadata", read_slot_metadata),
    ("verity", open_verity),
    ("mount-root", mount_root),
    ("prefetch", prefetch::start),
    ("selinux", |ctx| {
        ctx.selinux = selinux::phase(Path::new(SYSROOT), selinux::permissive_asked(&ctx.cmdline))?;
        Ok(())
    }),
    ("handoff", write_handoff),
];

/// Run stage 1. Returns only if it failed; the caller reboots.
pub fn stage1() -> Failure {
    let mut ctx = Ctx {
        cmdline: Cmdline::default(),
        parts: Vec::new(),
        disk: PathBuf::new(),
        sector: 0,
        attempt: None,
        meta: None,
        started: Instant::now(),
        watchdog: None,
        secure_boot: false,
        selinux: selinux::State::off("not loaded yet"),
        autoboot: None,
    };
    for (name, phase) in PHASES {
        let (t, start_ms) = (Instant::now(), report::uptime_ms());
        if let Err(error) = phase(&mut ctx) {
            return Failure { stage: 1, phase: name, error };
        }
        if let Some(w) = ctx.watchdog.as_mut() {
            w.feed();
        }
        report::phase(1, name, start_ms, t);
        info!("stage1 phase {name} done in {} us", t.elapsed().as_micros());
    }
    let error = switch_root();
    Failure { stage: 1, phase: "switch-root", error: BootError::io_on("switch into", SYSROOT.into())(error) }
}

fn early_mounts(ctx: &mut Ctx) -> Result<(), BootError> {
    mounts::mount_all(mounts::EARLY)?;
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

fn find_disk(ctx: &mut Ctx) -> Result<(), BootError> {
    let wait = Duration::from_secs(ctx.cmdline.get_u64("rootwait", 10));
    ctx.parts = partitions::wait_for(LABELS, ctx.cmdline.get("disk"), wait)?;
    let first = &ctx.parts[0];
    ctx.disk = first.disk_path();
    let f = fs::File::open(&ctx.disk).map_err(BootError::io("open", &ctx.disk))?;
    ctx.sector = sys::logical_sector_size(&f).map_err(BootError::io("sector size of", &ctx.disk))? as u64;
    info!("disk {} (sector {} bytes, {} partitions)", ctx.disk.display(), ctx.sector, ctx.parts.len());
    Ok(())
}

fn choose_slot(ctx: &mut Ctx) -> Result<(), BootError> {
    let forced = match ctx.cmdline.get("slot") {
        Some(s) => Some(Slot::parse(s).ok_or_else(|| BootError::Cmdline {
            key: "slot",
            value: s.into(),
            expected: "A or B",
        })?),
        None => None,
    };
    let mut bc = GptBootControl::new(&ctx.disk, ctx.sector);
    let uefi = booted_as_uki()?;
    let pi = if uefi {
        None
    } else {
        Bootloader::read(Path::new(rpi::BOOTLOADER_DT)).map_err(bootctl::Error::Rpi)?
    };
    if uefi {
        firmware_chose(ctx, &mut bc, forced)?;
    }
    let forced = match pi {
        Some(bl) => Some(pi_firmware_chose(ctx, &mut bc, bl, forced)?),
        None => forced,
    };
    let a = bc.begin_boot(forced)?;
    info!(
        "boot control: slot {} (on trial: {}, tries left: {}{})",
        a.slot,
        a.on_trial,
        a.tries_left,
        match (uefi || pi.is_some(), forced.is_some()) {
            (true, _) => ", started by the firmware",
            (false, true) => ", forced by berth.slot",
            (false, false) => "",
        }
    );
    if uefi || pi.is_some() {
        // Entries missing (first boot, NVRAM cleared) or a change cut short: fixed now. Not
        // fatal: this boot is under way; the next one tries again.
        if let Err(e) = bc.sync_firmware() {
            error!("boot control: telling the firmware: {e}");
        }
    }
    ctx.watchdog = watchdog::arm(&ctx.cmdline, a.on_trial);
    ctx.attempt = Some(a);
    Ok(())
}

/// Whether the firmware started a UKI (systemd-stub left `LoaderDevicePartUUID`): then the
/// UEFI backend applies. Mounts efivarfs (and securityfs) when the firmware is UEFI.
fn booted_as_uki() -> Result<bool, BootError> {
    if !Path::new("/sys/firmware/efi").exists() {
        return Ok(false);
    }
    let vars = Path::new(bootctl::uefi::EFIVARS);
    if !mounts::is_mountpoint(vars) {
        sys::mount(
            Some("efivarfs"),
            vars,
            Some("efivarfs"),
            sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC,
            None,
        )
        .map_err(BootError::io_on("mount", format!("efivarfs on {}", vars.display())))?;
    }
    Ok(bootctl::uefi::booted_as_uki(vars))
}

/// Under UEFI the firmware chose the slot, and the signed command line names it. Check the
/// two agree, that boot control has not given up on that slot, and lock the kernel down when
/// Secure Boot is on.
fn firmware_chose(ctx: &mut Ctx, bc: &mut GptBootControl, named: Option<Slot>) -> Result<(), BootError> {
    bootctl::install_uefi(&ctx.disk, ctx.sector, Path::new(bootctl::uefi::EFIVARS))?;
    let slot = named.ok_or(BootError::Cmdline {
        key: "slot",
        value: String::new(),
        expected: "A or B (a UKI's command line names its slot)",
    })?;
    if let Some(from) = bootctl::uefi_loaded_from() {
        if from != slot {
            return Err(BootError::SlotMismatch { named: slot, loaded_from: from });
        }
    }
    let vars = bootctl::uefi::Vars::new(bootctl::uefi::EFIVARS);
    ctx.secure_boot = vars.secure_boot();
    let current = vars.get_u16s("BootCurrent").ok().and_then(|l| l.first().copied());
    info!(
        "UEFI boot of slot {slot}'s UKI (BootCurrent {}), Secure Boot {}",
        current.map_or("unknown".to_string(), |n| format!("{n:04X}")),
        if ctx.secure_boot { "on" } else { "off" }
    );
    if ctx.secure_boot {
        lock_down();
    }
    let states = bc.states()?;
    if !states[slot].bootable() {
        if let Some(other) = bootctl::choose(states.a, states.b) {
            // The firmware started a slot boot control gave up on (its variables were not
            // updated, or were lost): tell it, then restart into the right one. Only when that
            // changed the firmware's variables, so this can never loop.
            if bc.sync_firmware()? == Some(true) {
                return Err(BootError::WrongSlot { started: slot, boots: other });
            }
            error!("the firmware started slot {slot}, which boot control gave up on; booting it anyway");
        }
    }
    Ok(())
}

/// The Raspberry Pi firmware booted the partition `autoboot.txt` named (`[tryboot]`'s once
/// after a tryboot restart): that slot runs. Rewrites go to `autoboot.txt` from now on. When
/// boot control has given up on the slot (a tryboot restart by hand, a record that reached
/// the disk and not `autoboot.txt`), `autoboot.txt` is made right and the machine restarts
/// into the right slot: a plain restart boots `[all]`, the known-good slot, so this cannot
/// loop.
fn pi_firmware_chose(
    ctx: &mut Ctx,
    bc: &mut GptBootControl,
    bl: Bootloader,
    named: Option<Slot>,
) -> Result<Slot, BootError> {
    let part = partitions::by_label(&ctx.parts, rpi::LABEL)?;
    ctx.autoboot = Some(part.path());
    let boot = bootctl::install_rpi(&ctx.disk, ctx.sector, rpi::Location::Partition(part.path()))?;
    let slot = bl.slot(boot).ok_or_else(|| {
        bootctl::Error::Rpi(rpi::Error::Invalid(
            rpi::BOOTLOADER_DT.into(),
            format!(
                "the firmware booted partition {}, which is neither BERTH-BOOT-A ({}) nor BERTH-BOOT-B ({})",
                bl.partition, boot[0], boot[1]
            ),
        ))
    })?;
    info!(
        "Raspberry Pi firmware booted partition {} (slot {slot}){}",
        bl.partition,
        if bl.tryboot { " on a tryboot" } else { "" }
    );
    if let Some(named) = named.filter(|n| *n != slot) {
        warn!("berth.slot={named} ignored: the firmware started slot {slot}");
    }
    let states = bc.states()?;
    if !states[slot].bootable() {
        if let Some(other) = bootctl::choose(states.a, states.b) {
            let changed = bc.sync_firmware()? == Some(true);
            if changed || bl.tryboot {
                return Err(BootError::WrongSlot { started: slot, boots: other });
            }
            error!("the firmware started slot {slot}, which boot control gave up on; booting it anyway");
        }
    }
    Ok(slot)
}

/// Secure Boot is on: the kernel runs locked down (integrity). x86_64 kernels do it
/// themselves; elsewhere it is set here, before anything else runs.
fn lock_down() {
    let sec = Path::new("/sys/kernel/security");
    if !mounts::is_mountpoint(sec) {
        let _ = sys::mount(
            Some("securityfs"),
            sec,
            Some("securityfs"),
            sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC,
            None,
        );
    }
    let file = sec.join("lockdown");
    match fs::read_to_string(&file) {
        Ok(now) if now.contains("[none]") => match fs::write(&file, "integrity") {
            Ok(()) => info!("kernel lockdown: integrity (Secure Boot is on)"),
            Err(e) => error!("kernel lockdown: {}: {e}", file.display()),
        },
        Ok(now) => info!("kernel lockdown: {}", now.trim()),
        Err(e) => error!("kernel lockdown: {}: {e}", file.display()),
    }
}

fn read_slot_metadata(ctx: &mut Ctx) -> Result<(), BootError> {
    let slot = ctx.slot()?;
    let boot = ctx.part("BOOT")?;
    let meta_err = |error: String| BootError::SlotMeta { slot, error };
    let text = partitions::with_boot_mounted(boot, |dir| fs::read_to_string(dir.join(SlotMeta::FILE)))?
        .map_err(|e| meta_err(format!("{} on {}: {e}", SlotMeta::FILE, boot.label)))?;
    let mut meta =
        SlotMeta::parse(&text).map_err(|e| meta_err(format!("{} on {}: {e}", SlotMeta::FILE, boot.label)))?;
    // The kernel command line's root hash (signed, in a UKI) is the one that counts; slot.toml
    // sits on an unsigned partition.
    if let Some(want) = ctx.cmdline.get("verity.roothash") {
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BootError::Cmdline {
                key: "verity.roothash",
                value: want.into(),
                expected: "64 hex digits",
            });
        }
        if !want.eq_ignore_ascii_case(&meta.verity.root_hash) {
            warn!(
                "slot {slot}: {} says root hash {}, the kernel command line {want}; using the command line's",
                SlotMeta::FILE,
                meta.verity.root_hash
            );
            meta.verity.root_hash = want.to_ascii_lowercase();
        }
    }
    info!("slot {slot} is version {} ({} {})", meta.version, meta.variant, meta.arch);
    ctx.meta = Some(meta);
    Ok(())
}

fn open_verity(ctx: &mut Ctx) -> Result<(), BootError> {
    let slot = ctx.slot()?;
    let meta = ctx.meta()?;
    let root = ctx.part("ROOT")?;
    let hash = ctx.part("HASH")?;
    let target = dm::Target {
        start_sector: 0,
        sectors: meta.verity.data_sectors(),
        kind: "verity".into(),
        params: meta.verity.table(&root.majmin(), &hash.majmin()),
    };
    let uuid = format!("BERTH-VERITY-{slot}-{}", &meta.verity.root_hash[..16]);
    let (major, minor) = dm::create(VERITY_NAME, &uuid, &[target], true)
        .map_err(BootError::io_on("set up dm-verity over", format!("{} + {}", root.dev, hash.dev)))?;
    fs::create_dir_all("/dev/mapper").map_err(BootError::io("mkdir", "/dev/mapper"))?;
    let node = Path::new("/dev/mapper").join(VERITY_NAME);
    let _ = fs::remove_file(&node);
    sys::mknod_block(&node, major, minor, 0o600).map_err(BootError::io("mknod", &node))?;
    info!("dm-verity {} over {} + {} as {major}:{minor}", node.display(), root.dev, hash.dev);
    Ok(())
}

fn mount_root(_ctx: &mut Ctx) -> Result<(), BootError> {
    fs::create_dir_all(SYSROOT).map_err(BootError::io("mkdir", SYSROOT))?;
    let dev = format!("/dev/mapper/{VERITY_NAME}");
    sys::mount(Some(&dev), Path::new(SYSROOT), Some("erofs"), sys::MS_RDONLY, None)
        .map_err(BootError::io_on("mount", format!("{dev} (erofs) on {SYSROOT}")))?;
    let init = Path::new(SYSROOT).join("sbin/init");
    if !init.exists() {
        return Err(BootError::Handoff { path: init, error: "does not exist in the root filesystem".into() });
    }
    Ok(())
}

fn write_handoff(ctx: &mut Ctx) -> Result<(), BootError> {
    let meta = ctx.meta()?;
    let a = ctx.attempt()?;
    let h = Handoff {
        slot: a.slot,
        on_trial: a.on_trial,
        tries_left: a.tries_left,
        disk: ctx.disk.clone(),
        sector_size: ctx.sector,
        version: meta.version.clone(),
        variant: meta.variant.clone(),
        root_hash: meta.verity.root_hash.clone(),
        stage1_ms: ctx.started.elapsed().as_millis() as u64,
        phases: report::phases(),
        boot: if bootctl::uefi_installed() {
            "uefi"
        } else if bootctl::rpi_installed() {
            "rpi"
        } else {
            "direct"
        }
        .into(),
        secure_boot: ctx.secure_boot,
        selinux: ctx.selinux.clone(),
        notices: report::notices(),
        autoboot: ctx.autoboot.clone(),
    };
    let text =
        toml::to_string(&h).map_err(|e| BootError::Handoff { path: HANDOFF.into(), error: e.to_string() })?;
    fs::write(HANDOFF, text).map_err(BootError::io("write", HANDOFF))
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

/// How long a fatal path waits for the disks to take what is in the page cache.
const FATAL_SYNC_BOUND: Duration = Duration::from_secs(5);
/// Seconds the kernel waits before rebooting after a panic, when `panic=` was not set.
const PANIC_REBOOT_SECS: &str = "10";

/// sync(2) in a helper thread, waiting at most `bound`: a wedged device must not turn a
/// reboot or shutdown into a hang. Returns whether the sync finished in time.
pub fn bounded_sync(bound: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("sync".into()).stack_size(64 * 1024).spawn(move || {
        sys::sync();
        let _ = tx.send(());
    });
    spawned.is_ok() && rx.recv_timeout(bound).is_ok()
}

/// reboot(2) in `mode`; if the kernel refuses, PID 1 exits: the kernel panics ("Attempted to
/// kill init") and reboots after `panic=N` seconds (set here if the command line left it 0).
pub fn reboot_or_panic(mode: sys::RebootMode) -> ! {
    let arg = match mode {
        sys::RebootMode::Restart => bootctl::restart_argument(),
        _ => None,
    };
    let e = match arg {
        Some(arg) => {
            info!("restarting with \"{arg}\": the firmware tries the slot on trial once");
            sys::restart_with(arg)
        }
        None => sys::reboot(mode),
    };
    error!("reboot({mode:?}) failed: {e}; exiting PID 1 so that the kernel panics and reboots");
    if fs::read_to_string("/proc/sys/kernel/panic").is_ok_and(|v| v.trim() == "0") {
        let _ = fs::write("/proc/sys/kernel/panic", PANIC_REBOOT_SECS);
    }
    std::process::exit(1)
}

/// Fatal error before the boot was marked good: log, give the disks a bounded moment, reboot.
pub fn fail_and_reboot(what: &dyn std::fmt::Display) -> ! {
    error!("FATAL: {what}");
    error!("rebooting so that boot control can fall back");
    if !bounded_sync(FATAL_SYNC_BOUND) {
        error!("sync did not finish within {}s; rebooting anyway", FATAL_SYNC_BOUND.as_secs());
    }
    // Let the console drain.
    std::thread::sleep(Duration::from_millis(300));
    reboot_or_panic(sys::RebootMode::Restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_carries_selinux_and_stage_1_notices() {
        let h = Handoff {
            slot: Slot::B,
            on_trial: true,
            tries_left: 0,
            disk: "/dev/vda".into(),
            sector_size: 512,
            version: "0.2.0".into(),
            variant: "qemu".into(),
            root_hash: "ab".repeat(32),
            stage1_ms: 1200,
            phases: vec![report::PhaseTime { stage: 1, name: "selinux".into(), start_ms: 3, duration_us: 4 }],
            boot: "direct".into(),
            secure_boot: false,
            selinux: selinux::State {
                mode: "permissive".into(),
                policy: None,
                error: Some("the kernel refused the policy".into()),
            },
            notices: vec!["SELinux: the kernel refused the policy; permissive".into()],
            autoboot: None,
        };
        let back: Handoff = toml::from_str(&toml::to_string(&h).unwrap()).unwrap();
        assert_eq!(back.selinux, h.selinux);
        assert_eq!(back.notices, h.notices);
        assert_eq!(back.phases.len(), 1);
        // A handoff from a stage 1 that did not hand notices over reads as none.
        let old = toml::to_string(&h).unwrap();
        let old: String = old.lines().filter(|l| !l.starts_with("notices")).collect::<Vec<_>>().join("\n");
        let back: Handoff = toml::from_str(&old).unwrap();
        assert!(back.notices.is_empty());
    }
}
