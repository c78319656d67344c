//! The boot's typed errors. Every phase of stage 1 and stage 2 returns a [`BootError`] that
//! names what failed (the path, device, partition, slot or kernel argument) and why; the phase
//! runner wraps it in a [`Failure`] with the stage and phase, which is what the console shows
//! before the reboot that lets boot control fall back.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bootctl::{self, Slot};

#[derive(Debug)]
pub enum BootError {
    /// An operation (`op`: mount, mkdir, open, read, write, ...) on `target` failed.
    Io { op: &'static str, target: String, error: io::Error },
    /// The disk with Berth's partitions did not appear in time.
    NoDisk { labels: Vec<String>, disk: Option<String>, waited: Duration, seen: Vec<String> },
    /// A partition Berth needs is not on the boot disk.
    NoPartition(String),
    /// Boot control could not choose or record a slot.
    BootControl(bootctl::Error),
    /// The slot's metadata (`slot.toml` on its BOOT partition) is missing or malformed.
    SlotMeta { slot: Slot, error: String },
    /// The UKI's command line names one slot, the firmware loaded it from the other's ESP.
    SlotMismatch { named: Slot, loaded_from: Slot },
    /// The firmware started a slot boot control gave up on; it was told, and the machine
    /// restarts into the right one.
    WrongSlot { started: Slot, boots: Slot },
    /// A `berth.*` kernel argument that cannot be used.
    Cmdline { key: &'static str, value: String, expected: &'static str },
    /// A file stage 1 hands to stage 2, or stage 2 expects in the root, is missing or malformed.
    Handoff { path: PathBuf, error: String },
    /// A phase ran before the one that provides its input (a bug in a phase table).
    Order { needs: &'static str },
    /// The network could not be set up.
    Network(crate::net::Error),
    /// The settings datastore could not be opened or used.
    Datastore(crate::settings::store::Error),
    /// A thread PID 1 needs could not be started.
    Thread { name: &'static str, error: io::Error },
    /// The SELinux policy could not be loaded or enforced (`boot::selinux`).
    Selinux { error: String },
    /// The phase panicked.
    Panic(String),
}

impl BootError {
    /// An error of `op` on `target`, as the `map_err` of an io::Result.
    pub fn io(op: &'static str, target: impl AsRef<Path>) -> impl FnOnce(io::Error) -> BootError {
        let target = target.as_ref().display().to_string();
        move |error| BootError::Io { op, target, error }
    }

    /// Like [`BootError::io`] for a target that is not a path (a device with its label, ...).
    pub fn io_on(op: &'static str, target: String) -> impl FnOnce(io::Error) -> BootError {
        move |error| BootError::Io { op, target, error }
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Io { op, target, error } => write!(f, "{op} {target}: {error}"),
            BootError::NoDisk { labels, disk, waited, seen } => write!(
                f,
                "no disk{} with partitions {} after {}s (labelled partitions seen: [{}]); is the \
                 disk attached, and was the image written whole?",
                disk.as_ref().map(|d| format!(" '{d}'")).unwrap_or_default(),
                labels.join(", "),
                waited.as_secs(),
                seen.join(", ")
            ),
            BootError::NoPartition(label) => write!(f, "no partition labelled {label} on the boot disk"),
            BootError::BootControl(e) => write!(f, "boot control: {e}"),
            BootError::SlotMeta { slot, error } => write!(f, "slot {slot} metadata: {error}"),
            BootError::SlotMismatch { named, loaded_from } => write!(
                f,
                "the UKI names slot {named} but the firmware loaded it from slot {loaded_from}'s BOOT \
                 partition; was a UKI copied to the other slot's partition?"
            ),
            BootError::WrongSlot { started, boots } => write!(
                f,
                "the firmware started slot {started}, which is not bootable (a failed update); its boot \
                 variables now say slot {boots}, restarting into it"
            ),
            BootError::Cmdline { key, value, expected } => {
                write!(f, "kernel argument berth.{key}={value}: expected {expected}")
            }
            BootError::Handoff { path, error } => write!(f, "{}: {error}", path.display()),
            BootError::Order { needs } => write!(f, "internal error: phase run before {needs} was known"),
            BootError::Network(e) => write!(f, "network: {e}"),
            BootError::Datastore(e) => write!(f, "settings datastore: {e}"),
            BootError::Thread { name, error } => write!(f, "starting the {name} thread: {error}"),
            BootError::Selinux { error } => write!(
                f,
                "SELinux: {error} (berth.selinux=permissive on the kernel command line boots anyway, \
                 for debugging)"
            ),
            BootError::Panic(what) => write!(f, "panicked: {what}"),
        }
    }
}

impl std::error::Error for BootError {}

impl From<bootctl::Error> for BootError {
    fn from(e: bootctl::Error) -> BootError {
        BootError::BootControl(e)
    }
}

/// A phase that failed: what the console shows before the reboot.
#[derive(Debug)]
pub struct Failure {
    pub stage: u8,
    pub phase: &'static str,
    pub error: BootError,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {} phase {} failed: {}", self.stage, self.phase, self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_failed() {
        let e = Failure {
            stage: 2,
            phase: "data",
            error: BootError::io_on("mount", "/dev/vda8 (BERTH-DATA) on /local".into())(
                io::Error::from_raw_os_error(libc::EIO),
            ),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("stage 2 phase data failed: mount /dev/vda8 (BERTH-DATA) on /local: "),
            "{text}"
        );
        let e = BootError::Cmdline { key: "slot", value: "C".into(), expected: "A or B" };
        assert_eq!(e.to_string(), "kernel argument berth.slot=C: expected A or B");
    }
}
