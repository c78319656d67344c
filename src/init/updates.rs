//! The updater in PID 1: its configuration from the boot's facts, and reading a slot's
//! `slot.toml` from its BOOT partition as it is on the disk now.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info};

use super::{Ctx, PRIVATE};
use crate::boot::{partitions, BootError};
use crate::bootctl::{Slot, SlotMeta};
use crate::update::{self, Config, Disk, Updater};

fn read_slot_meta(disk: &Disk, slot: Slot) -> Result<String, String> {
    let label = slot.label("BOOT");
    let name = disk.path.file_name().map(|n| n.to_string_lossy().into_owned());
    let parts = partitions::wait_for(&[&label], name.as_deref(), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    let part = partitions::by_label(&parts, &label).map_err(|e| e.to_string())?;
    // The updater wrote through the whole disk: forget what the partition's own cache holds.
    if let Ok(f) = File::open(part.path()) {
        let _ = crate::sys::drop_page_cache(&f);
    }
    partitions::with_boot_mounted(part, |dir| std::fs::read_to_string(dir.join(SlotMeta::FILE)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{} on {label}: {e}", SlotMeta::FILE))
}

/// Create the updater (reconciling its state with boot control) and start its thread.
pub fn start(ctx: &mut Ctx) -> Result<(), BootError> {
    let h = &ctx.handoff;
    let version = h.version.parse().unwrap_or_else(|e| {
        error!("running version: {e}; every update will look newer");
        update::manifest::Version(0, 0, 0)
    });
    let cfg = Config {
        state_dir: Path::new(PRIVATE).join("updates"),
        trusted_root: update::TRUSTED_ROOT.into(),
        disk: Disk { path: h.disk.clone(), sector: h.sector_size },
        active: h.slot,
        on_trial: h.on_trial,
        variant: h.variant.clone(),
        arch: std::env::consts::ARCH.into(),
        version,
        clock_floor: update::build_time(Path::new(update::RELEASE)),
        clock: Arc::new(crate::time::SystemClock),
        read_slot_meta: Box::new(read_slot_meta),
    };
    let updater = Updater::new(cfg);
    updater.spawn().map_err(|error| BootError::Thread { name: "updater", error })?;
    info!("updater: {}", updater.status()["update_state"]);
    ctx.updater = Some(updater);
    Ok(())
}

pub fn boot_succeeded(updater: &Option<Arc<Updater>>) {
    if let Some(u) = updater {
        u.boot_succeeded();
    }
}
