//! Finding Berth's partitions by their GPT labels through sysfs, without udev.
//!
//! The kernel exports each partition's label as `PARTNAME=` in
//! `/sys/class/block/<dev>/uevent`; devtmpfs creates the `/dev/<dev>` nodes. Disks can appear
//! late (virtio probes asynchronously), so [`wait_for`] polls until a deadline.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::BootError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    /// GPT partition name (label), e.g. `BERTH-ROOT-A`.
    pub label: String,
    /// Kernel device name, e.g. `vda2`.
    pub dev: String,
    /// The whole disk it is on, e.g. `vda`.
    pub disk: String,
    pub number: u32,
    pub major: u32,
    pub minor: u32,
}

impl PartInfo {
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.dev)
    }

    pub fn disk_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.disk)
    }

    pub fn majmin(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

fn uevent_field<'a>(uevent: &'a str, key: &str) -> Option<&'a str> {
    uevent.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Parse one partition's uevent text; `disk` is the parent device's name.
fn parse_uevent(uevent: &str, disk: &str) -> Option<PartInfo> {
    if uevent_field(uevent, "DEVTYPE")? != "partition" {
        return None;
    }
    Some(PartInfo {
        label: uevent_field(uevent, "PARTNAME")?.to_string(),
        dev: uevent_field(uevent, "DEVNAME")?.to_string(),
        disk: disk.to_string(),
        number: uevent_field(uevent, "PARTN")?.parse().ok()?,
        major: uevent_field(uevent, "MAJOR")?.parse().ok()?,
        minor: uevent_field(uevent, "MINOR")?.parse().ok()?,
    })
}

/// Every labelled partition the kernel knows of now.
pub fn scan(sysfs_block: &Path) -> Vec<PartInfo> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(sysfs_block) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(uevent) = fs::read_to_string(dir.join("uevent")) else {
            continue;
        };
        // The parent of .../block/vda/vda1 is the disk.
        let disk = fs::canonicalize(&dir)
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        if let Some(p) = parse_uevent(&uevent, &disk) {
            out.push(p);
        }
    }
    out.sort_by(|a, b| a.dev.cmp(&b.dev));
    out
}

/// The partitions of the first disk (or of `disk`, if given) that holds all of `labels`,
/// waiting up to `timeout` for it to appear.
pub fn wait_for(labels: &[&str], disk: Option<&str>, timeout: Duration) -> Result<Vec<PartInfo>, BootError> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = scan(Path::new("/sys/class/block"));
        if let Some(found) = pick_disk(&all, labels, disk) {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(BootError::NoDisk {
                labels: labels.iter().map(|l| l.to_string()).collect(),
                disk: disk.map(String::from),
                waited: timeout,
                seen: all.iter().map(|p| format!("{}={}", p.dev, p.label)).collect(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pick_disk(all: &[PartInfo], labels: &[&str], disk: Option<&str>) -> Option<Vec<PartInfo>> {
    let mut disks: Vec<&str> = all.iter().map(|p| p.disk.as_str()).collect();
    disks.dedup();
    disks.into_iter().filter(|d| disk.is_none_or(|want| want == *d)).find_map(|d| {
        let on_disk: Vec<PartInfo> = all.iter().filter(|p| p.disk == d).cloned().collect();
        labels.iter().all(|l| on_disk.iter().any(|p| p.label == *l)).then_some(on_disk)
    })
}

/// Where a slot's BOOT partition is mounted while it is read.
pub const BOOT_MOUNT: &str = "/run/berth/boot";

/// Mount the BOOT (FAT) partition `part` read-only at [`BOOT_MOUNT`] for the time `f` runs.
pub fn with_boot_mounted<T>(part: &PartInfo, f: impl FnOnce(&Path) -> T) -> Result<T, BootError> {
    let dir = Path::new(BOOT_MOUNT);
    fs::create_dir_all(dir).map_err(BootError::io("mkdir", dir))?;
    crate::sys::mount(Some(&part.path().to_string_lossy()), dir, Some("vfat"), crate::sys::MS_RDONLY, None)
        .map_err(BootError::io_on(
        "mount",
        format!("{} ({}) on {BOOT_MOUNT}", part.path().display(), part.label),
    ))?;
    let r = f(dir);
    let _ = crate::sys::umount(dir, 0);
    Ok(r)
}

/// The partition labelled `label` in `parts`.
pub fn by_label<'a>(parts: &'a [PartInfo], label: &str) -> Result<&'a PartInfo, BootError> {
    parts.iter().find(|p| p.label == label).ok_or_else(|| BootError::NoPartition(label.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(label: &str, dev: &str, disk: &str) -> PartInfo {
        PartInfo { label: label.into(), dev: dev.into(), disk: disk.into(), number: 1, major: 254, minor: 1 }
    }

    #[test]
    fn parses_partition_uevents() {
        let u = "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nDISKSEQ=1\nPARTN=3\nPARTNAME=BERTH-HASH-A\n";
        let p = parse_uevent(u, "vda").unwrap();
        assert_eq!(
            p,
            PartInfo {
                label: "BERTH-HASH-A".into(),
                dev: "vda3".into(),
                disk: "vda".into(),
                number: 3,
                major: 254,
                minor: 3
            }
        );
        assert_eq!(p.majmin(), "254:3");
        assert!(parse_uevent("MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n", "block").is_none());
        // A partition without a label (MBR) is not one of ours.
        assert!(parse_uevent("MAJOR=8\nMINOR=1\nDEVNAME=sda1\nDEVTYPE=partition\nPARTN=1\n", "sda").is_none());
    }

    #[test]
    fn picks_the_disk_that_has_every_label() {
        let all = vec![
            part("BERTH-ROOT-A", "vda1", "vda"),
            part("BERTH-ROOT-A", "vdb1", "vdb"),
            part("BERTH-DATA", "vdb2", "vdb"),
        ];
        let got = pick_disk(&all, &["BERTH-ROOT-A", "BERTH-DATA"], None).unwrap();
        assert!(got.iter().all(|p| p.disk == "vdb"));
        assert!(pick_disk(&all, &["BERTH-ROOT-A", "BERTH-DATA"], Some("vda")).is_none());
        assert!(pick_disk(&all, &["BERTH-PRIVATE"], None).is_none());
        assert_eq!(by_label(&got, "BERTH-DATA").unwrap().dev, "vdb2");
        assert!(by_label(&got, "BERTH-X").is_err());
    }
}
