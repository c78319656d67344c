//! SELinux from the first instruction: stage 1 loads Berth's policy (`policy/`, compiled by
//! `secilc` at image build) from the verified root and sets enforcing before `switch_root`, so
//! the exec of `/sbin/init` already moves PID 1 from kernel_t into init_t by the file's label.
//!
//! The policy is written through selinuxfs: the whole binary policy in one write to
//! `/sys/fs/selinux/load`, then `1` to `/sys/fs/selinux/enforce` (the kernel starts permissive:
//! it is built with `SECURITY_SELINUX_DEVELOP`). Either failing is a fatal boot error, so a
//! slot on trial rolls back; `berth.selinux=permissive` on the kernel command line turns both
//! into a notice (for debugging), and the boot goes on permissive — with the policy loaded if
//! it loaded, so denials are still logged, or with none at all.
//!
//! What happened is handed to stage 2 ([`State`]) and reported in `GET /os` and `GET /selinux`.

use std::fs;
use std::io::Write;
use std::path::Path;

use log::info;
use serde::{Deserialize, Serialize};

use super::{mounts, BootError};
use crate::sys;

/// Where selinuxfs lives (sysfs creates the directory when the kernel has SELinux).
pub const SELINUXFS: &str = "/sys/fs/selinux";
/// The binary policy, relative to the root it is loaded from.
pub const POLICY: &str = "usr/share/berth/selinux/berth/policy/policy.33";
/// The largest policy stage 1 will read (Berth's is ~40 KiB; a policy is loaded whole).
const MAX_POLICY: u64 = 16 << 20;

/// How SELinux runs on this boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct State {
    /// `enforcing`, `permissive` (`berth.selinux=permissive`, or enforcing could not be set),
    /// or `off` (a kernel without SELinux, or booted without stage 1).
    pub mode: String,
    /// The policy file loaded, if one was.
    pub policy: Option<String>,
    /// What went wrong, when the mode is not what was asked for.
    pub error: Option<String>,
}

impl State {
    pub fn off(why: &str) -> State {
        State { mode: "off".into(), policy: None, error: Some(why.into()) }
    }
}

/// Whether the kernel command line asks for permissive mode (`berth.selinux=permissive`).
pub fn permissive_asked(cmdline: &super::Cmdline) -> bool {
    cmdline.get("selinux") == Some("permissive")
}

/// Mount selinuxfs at [`SELINUXFS`] if it is not mounted yet.
pub fn mount_selinuxfs() -> std::io::Result<()> {
    let dir = Path::new(SELINUXFS);
    if mounts::is_mountpoint(dir) {
        return Ok(());
    }
    sys::mount(Some("selinuxfs"), dir, Some("selinuxfs"), sys::MS_NOSUID | sys::MS_NOEXEC, None)
}

/// The stage 1 phase: mount selinuxfs, load the verified root's policy, set the mode.
pub fn phase(root: &Path, permissive: bool) -> Result<State, BootError> {
    let selinuxfs = Path::new(SELINUXFS);
    if !selinuxfs.is_dir() {
        return failed(
            format!("{SELINUXFS} does not exist: is the kernel built with SELinux in CONFIG_LSM?"),
            permissive,
        );
    }
    if let Err(e) = mount_selinuxfs() {
        return failed(format!("mount selinuxfs on {SELINUXFS}: {e}"), permissive);
    }
    load(root, selinuxfs, permissive)
}

/// A failure: fatal, or with `permissive` a notice and the boot goes on permissive.
fn failed(error: String, permissive: bool) -> Result<State, BootError> {
    if permissive {
        super::report::notice(format!("SELinux: {error}; permissive (berth.selinux=permissive)"));
        return Ok(State { mode: "permissive".into(), policy: None, error: Some(error) });
    }
    Err(BootError::Selinux { error })
}

/// Load the policy found under `root` through the selinuxfs at `selinuxfs` and set the mode.
/// Errors are [`BootError::Selinux`]; with `permissive` they are returned in the state instead.
pub fn load(root: &Path, selinuxfs: &Path, permissive: bool) -> Result<State, BootError> {
    let policy = root.join(POLICY);
    let fail = |error: String| failed(error, permissive);
    let bytes = match fs::metadata(&policy) {
        Ok(m) if m.len() > MAX_POLICY => {
            return fail(format!("{}: {} bytes, more than {MAX_POLICY}", policy.display(), m.len()))
        }
        Ok(_) => match fs::read(&policy) {
            Ok(b) => b,
            Err(e) => return fail(format!("read {}: {e}", policy.display())),
        },
        Err(e) => return fail(format!("{}: {e}", policy.display())),
    };
    if let Err(e) = write_once(&selinuxfs.join("load"), &bytes) {
        return fail(format!("the kernel refused the policy {}: {e}", policy.display()));
    }
    let loaded = Some(format!("/{POLICY}"));
    if permissive {
        info!("SELinux: policy loaded ({} bytes), permissive (berth.selinux=permissive)", bytes.len());
        return Ok(State { mode: "permissive".into(), policy: loaded, error: None });
    }
    if let Err(e) = set_enforcing(selinuxfs) {
        return Err(BootError::Selinux {
            error: format!("policy loaded, but enforcing could not be set: {e}"),
        });
    }
    info!("SELinux: policy loaded ({} bytes), enforcing", bytes.len());
    Ok(State { mode: "enforcing".into(), policy: loaded, error: None })
}

/// Write `1` to `enforce` and read it back.
fn set_enforcing(selinuxfs: &Path) -> std::io::Result<()> {
    let file = selinuxfs.join("enforce");
    write_once(&file, b"1")?;
    match fs::read_to_string(&file)?.trim() {
        "1" => Ok(()),
        other => Err(std::io::Error::other(format!("{} reads {other:?} after writing 1", file.display()))),
    }
}

/// One write(2) of all of `bytes` (selinuxfs takes a policy or a value in one write).
fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    let n = f.write(bytes)?;
    if n != bytes.len() {
        return Err(std::io::Error::other(format!("short write: {n} of {} bytes", bytes.len())));
    }
    Ok(())
}

/// Whether enforcing is on now (live, from selinuxfs); None when SELinux has no policy.
pub fn enforcing_now() -> Option<bool> {
    if fs::metadata(Path::new(SELINUXFS).join("policyvers")).is_err() {
        return None;
    }
    match fs::read_to_string(Path::new(SELINUXFS).join("enforce")).ok()?.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// This process's SELinux context (`/proc/self/attr/current`), None without a policy.
pub fn current_context() -> Option<String> {
    let c = fs::read_to_string("/proc/self/attr/current").ok()?;
    let c = c.trim_end_matches(['\0', '\n']).to_string();
    (!c.is_empty() && c != "kernel").then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissive_only_when_asked_for_by_name() {
        use super::super::Cmdline;
        assert!(permissive_asked(&Cmdline::parse("berth.selinux=permissive")));
        assert!(!permissive_asked(&Cmdline::parse("berth.selinux=0 selinux=0")));
        assert!(!permissive_asked(&Cmdline::parse("")));
    }

    /// A stand-in selinuxfs (plain files `load` and `enforce`) and a root holding `policy`.
    fn fixture(name: &str, policy: Option<&[u8]>) -> (std::path::PathBuf, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("berth-selinux-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let (root, selinuxfs) = (d.join("root"), d.join("selinuxfs"));
        fs::create_dir_all(&selinuxfs).unwrap();
        fs::write(selinuxfs.join("load"), b"").unwrap();
        fs::write(selinuxfs.join("enforce"), b"0").unwrap();
        if let Some(p) = policy {
            let file = root.join(POLICY);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, p).unwrap();
        }
        (root, selinuxfs)
    }

    #[test]
    fn the_policy_is_written_whole_then_enforcing_is_set() {
        let (root, fs_) = fixture("ok", Some(b"binary policy"));
        let s = load(&root, &fs_, false).unwrap();
        assert_eq!(s, State { mode: "enforcing".into(), policy: Some(format!("/{POLICY}")), error: None });
        assert_eq!(fs::read(fs_.join("load")).unwrap(), b"binary policy");
        assert_eq!(fs::read_to_string(fs_.join("enforce")).unwrap(), "1");
        // Asked for permissive: loaded, enforce left alone.
        fs::write(fs_.join("enforce"), b"0").unwrap();
        let s = load(&root, &fs_, true).unwrap();
        assert_eq!((s.mode.as_str(), s.policy.is_some()), ("permissive", true));
        assert_eq!(fs::read_to_string(fs_.join("enforce")).unwrap(), "0");
    }

    #[test]
    fn a_missing_policy_is_fatal_unless_permissive() {
        let (root, fs_) = fixture("missing", None);
        let e = load(&root, &fs_, false).unwrap_err().to_string();
        assert!(e.starts_with("SELinux: ") && e.contains("policy.33"), "{e}");
        let s = load(&root, &fs_, true).unwrap();
        assert_eq!(s.mode, "permissive");
        assert!(s.policy.is_none() && s.error.is_some(), "{s:?}");
    }
}
