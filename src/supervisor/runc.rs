//! `/usr/libexec/berth/runc`: the runc that host containers (and any container whose creator
//! asks for it: `ctr run --runc-binary /usr/libexec/berth/runc`) are run with. It is this
//! binary under another name: before `runc create` or `runc run` it gives the container its
//! SELinux labels in the bundle's `config.json`, then execs `/usr/sbin/runc` with the same
//! arguments, so runc itself applies them (setexeccon before the container's first exec, the
//! mount label on the container's /dev, /dev/shm, ... mounts).
//!
//! Why: containerd's CRI labels the containers kubelet asks for, but `ctr` (which berth uses
//! for host containers) has no way to name a label. The label comes from the annotation
//! `org.berth.selinux` (`ctr run --annotation`), which only whoever can reach containerd's
//! socket can set (the OS and superpowered host containers):
//!
//! | annotation | process label | mount label |
//! |---|---|---|
//! | `super` | `super_t:s0-s0:c0.c1023` | none (the host's files keep theirs) |
//! | `control` | `control_t:s0:cA,cB` | `container_file_t:s0:cA,cB` |
//! | none | `container_t:s0:cA,cB` | `container_file_t:s0:cA,cB` |
//!
//! cA,cB are two different categories drawn at random from c0..c1023 (one pair in 523,776:
//! CRI draws its own the same way). A spec that names a label already (CRI's) is left as is.
//! The annotation `org.berth.pids-limit=N` sets the container's `pids.max` (ctr has no flag
//! for it). Without a loaded policy nothing is labelled.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub const WRAPPER: &str = "/usr/libexec/berth/runc";
const RUNC: &str = "/usr/sbin/runc";
pub const LABEL_ANNOTATION: &str = "org.berth.selinux";
pub const PIDS_ANNOTATION: &str = "org.berth.pids-limit";
/// The largest config.json read (a spec is a few KiB).
const MAX_SPEC: u64 = 4 << 20;
/// runc's global options that take a value (the subcommand follows them).
const GLOBAL_WITH_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];

pub fn main(args: &[String]) -> i32 {
    if let Some(bundle) = bundle_to_label(args) {
        if let Err(e) = label_bundle(&bundle.join("config.json"), policy_loaded()) {
            eprintln!("berth runc wrapper: {}: {e}", bundle.display());
            return 1;
        }
    }
    let e = std::process::Command::new(RUNC).arg0("runc").args(args).exec();
    eprintln!("berth runc wrapper: exec {RUNC}: {e}");
    127
}

/// The bundle of a `create` or `run` command line, if this is one.
fn bundle_to_label(args: &[String]) -> Option<PathBuf> {
    let mut i = 0;
    // Global options, then the subcommand.
    while i < args.len() && args[i].starts_with('-') {
        i += if GLOBAL_WITH_VALUE.contains(&args[i].as_str()) { 2 } else { 1 };
    }
    if !matches!(args.get(i).map(String::as_str), Some("create" | "run")) {
        return None;
    }
    let rest = &args[i + 1..];
    for (j, a) in rest.iter().enumerate() {
        if a == "--bundle" || a == "-b" {
            return rest.get(j + 1).map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--bundle=") {
            return Some(PathBuf::from(v));
        }
    }
    Some(PathBuf::from("."))
}

/// Whether a policy is loaded (a process's context reads `kernel` without one).
fn policy_loaded() -> bool {
    crate::boot::selinux::current_context().is_some()
}

/// Give the spec at `path` its labels (when `selinux`) and its pids limit.
fn label_bundle(path: &Path, selinux: bool) -> Result<(), String> {
    let mut text = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_SPEC).read_to_end(&mut text))
        .map_err(|e| format!("read: {e}"))?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(|e| format!("not a runtime spec: {e}"))?;
    apply(&mut spec, selinux, random_pair)?;
    let tmp = path.with_extension("json.berth");
    fs::write(&tmp, serde_json::to_vec(&spec).map_err(|e| e.to_string())?)
        .map_err(|e| format!("write: {e}"))?;
    fs::rename(&tmp, path).map_err(|e| format!("rename: {e}"))
}

/// The labels and limits of the table in the module docs, applied to `spec`.
fn apply(spec: &mut Value, selinux: bool, pair: impl Fn() -> (u16, u16)) -> Result<(), String> {
    let annotation = |k: &str| spec["annotations"][k].as_str().map(str::to_string);
    let (kind, pids) = (annotation(LABEL_ANNOTATION), annotation(PIDS_ANNOTATION));
    if let Some(p) = pids {
        let n: i64 = p.parse().map_err(|_| format!("{PIDS_ANNOTATION}={p}: not a number"))?;
        spec["linux"]["resources"]["pids"] = json!({ "limit": n });
    }
    let named = spec["process"]["selinuxLabel"].as_str().is_some_and(|l| !l.is_empty());
    if !selinux || named {
        return Ok(());
    }
    let (a, b) = pair();
    let level = format!("s0:c{a},c{b}");
    let (process, mount) = match kind.as_deref() {
        Some("super") => ("system_u:system_r:super_t:s0-s0:c0.c1023".to_string(), None),
        Some("control") => (format!("system_u:system_r:control_t:{level}"), Some(level)),
        None => (format!("system_u:system_r:container_t:{level}"), Some(level)),
        Some(other) => return Err(format!("{LABEL_ANNOTATION}={other}: expected super or control")),
    };
    spec["process"]["selinuxLabel"] = json!(process);
    if let Some(level) = mount {
        spec["linux"]["mountLabel"] = json!(format!("system_u:object_r:container_file_t:{level}"));
    }
    Ok(())
}

/// Two different categories in 0..1024, the smaller first.
fn random_pair() -> (u16, u16) {
    let mut b = [0u8; 4];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let x = u16::from_le_bytes([b[0], b[1]]) % 1024;
    let mut y = u16::from_le_bytes([b[2], b[3]]) % 1023;
    if y >= x {
        y += 1;
    }
    (x.min(y), x.max(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn finds_the_bundle_of_create_and_run_only() {
        let a = args("--root /run/containerd/runc/berth --log /x/log.json --log-format json create --bundle /b/admin --pid-file /b/init.pid admin");
        assert_eq!(bundle_to_label(&a), Some(PathBuf::from("/b/admin")));
        assert_eq!(bundle_to_label(&args("run -b /b x")), Some(PathBuf::from("/b")));
        assert_eq!(bundle_to_label(&args("run --bundle=/c x")), Some(PathBuf::from("/c")));
        assert_eq!(bundle_to_label(&args("create x")), Some(PathBuf::from(".")));
        for other in ["--root /r start admin", "--root /r delete --force admin", "state x", "--version"] {
            assert_eq!(bundle_to_label(&args(other)), None, "{other}");
        }
    }

    #[test]
    fn labels_follow_the_annotation() {
        let pair = || (12, 507);
        let mut s = json!({"process": {"args": ["sh"]}, "annotations": {LABEL_ANNOTATION: "control", PIDS_ANNOTATION: "1024"}});
        apply(&mut s, true, pair).unwrap();
        assert_eq!(s["process"]["selinuxLabel"], "system_u:system_r:control_t:s0:c12,c507");
        assert_eq!(s["linux"]["mountLabel"], "system_u:object_r:container_file_t:s0:c12,c507");
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], 1024);
        let mut s = json!({"annotations": {LABEL_ANNOTATION: "super"}});
        apply(&mut s, true, pair).unwrap();
        assert_eq!(s["process"]["selinuxLabel"], "system_u:system_r:super_t:s0-s0:c0.c1023");
        assert!(s["linux"]["mountLabel"].is_null());
        let mut s = json!({"process": {}});
        apply(&mut s, true, pair).unwrap();
        assert_eq!(s["process"]["selinuxLabel"], "system_u:system_r:container_t:s0:c12,c507");
        // CRI's own label is kept; without a policy nothing is labelled.
        let mut s = json!({"process": {"selinuxLabel": "system_u:system_r:container_t:s0:c1,c2"}});
        apply(&mut s, true, pair).unwrap();
        assert_eq!(s["process"]["selinuxLabel"], "system_u:system_r:container_t:s0:c1,c2");
        let mut s = json!({"process": {}});
        apply(&mut s, false, pair).unwrap();
        assert!(s["process"]["selinuxLabel"].is_null());
        let mut s = json!({"annotations": {LABEL_ANNOTATION: "root"}});
        assert!(apply(&mut s, true, pair).unwrap_err().contains("expected super or control"));
    }

    #[test]
    fn random_pairs_are_two_different_categories() {
        for _ in 0..1000 {
            let (a, b) = random_pair();
            assert!(a < b && b < 1024, "{a},{b}");
        }
    }
}
