//! Mount tables: each boot stage's fixed mounts are data, applied in order by [`mount_all`].

use std::path::Path;

use super::BootError;

use crate::sys;

#[derive(Debug, Clone, Copy)]
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: libc::c_ulong,
    pub data: Option<&'static str>,
}

const NODEV_NOEXEC: libc::c_ulong = sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC;

/// The first mounts of stage 1, in the initramfs.
pub const EARLY: &[Mount] = &[
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: NODEV_NOEXEC, data: None },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NODEV_NOEXEC, data: None },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: sys::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: sys::MS_NOSUID | sys::MS_NODEV,
        data: Some("mode=0755"),
    },
];

/// Is `target` already a mount point (its device differs from its parent's)?
pub fn is_mountpoint(target: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(parent)) = (std::fs::metadata(target), target.parent()) else {
        return false;
    };
    std::fs::metadata(parent).map(|p| p.dev() != me.dev()).unwrap_or(false)
}

/// Mount every entry of `table` under `root`, creating mount points; entries already mounted
/// are skipped, so a stage can run after another that did part of the work.
pub fn mount_all(table: &[Mount]) -> Result<(), BootError> {
    for m in table {
        let target = Path::new(m.target);
        if is_mountpoint(target) {
            continue;
        }
        std::fs::create_dir_all(target).map_err(BootError::io("mkdir", target))?;
        sys::mount(Some(m.source), target, Some(m.fstype), m.flags, m.data)
            .map_err(BootError::io_on("mount", format!("{} on {}", m.fstype, m.target)))?;
    }
    Ok(())
}
