//! `GET /report` and `GET /report/cis[?format=json][&level=1|2]` (`apiclient report cis`): the
//! CIS-style checks that apply to Berth, modelled on the items of the CIS Bottlerocket
//! Benchmark that have a counterpart here. Every check reads the running system (sysctls under
//! /proc/sys, SELinux's and lockdown's files, the mount table, dm-verity's status, the files of
//! the system directories); none is a constant. A check that cannot read what it needs is
//! `SKIP` with the reason, never `PASS`.
//!
//! The items and their numbers follow Bottlerocket's report where one exists; Berth has no
//! package manager, SSH server or systemd, so the benchmark's items about those do not apply
//! and are not listed. Level 2 items are included with `level=2`.
//!
//! Bounds: the world-writable scan visits at most [`MAX_SCAN`] entries per directory tree and
//! does not follow symbolic links or cross into other filesystems.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The most directory entries one world-writable scan visits.
pub const MAX_SCAN: usize = 200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: &'static str,
    pub title: &'static str,
    pub level: u8,
    pub status: Status,
    /// What was found (the value read, the offending file, why it was skipped).
    pub detail: String,
}

/// Where the checks look: `/` on a running system, a fixture tree in tests.
pub struct System {
    pub root: PathBuf,
}

impl System {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &str) -> Result<String, String> {
        fs::read_to_string(self.path(p)).map(|s| s.trim().to_string()).map_err(|e| format!("{p}: {e}"))
    }

    fn sysctl(&self, key: &str) -> Result<String, String> {
        self.read(&format!("/proc/sys/{}", key.replace('.', "/")))
    }
}

/// A sysctl check: every key must have the wanted value.
type SysctlCheck = (&'static str, &'static str, u8, &'static [(&'static str, &'static str)]);

const SYSCTLS: &[SysctlCheck] = &[
    (
        "1.4.1",
        "Ensure address space layout randomization (ASLR) is enabled",
        1,
        &[("kernel.randomize_va_space", "2")],
    ),
    ("1.5.2", "Ensure dmesg access is restricted", 1, &[("kernel.dmesg_restrict", "1")]),
    ("1.5.3", "Ensure kernel pointers are hidden", 2, &[("kernel.kptr_restrict", "2")]),
    ("1.5.4", "Ensure unprivileged eBPF is disabled", 1, &[("kernel.unprivileged_bpf_disabled", "2")]),
    ("1.5.5", "Ensure core dumps of set-uid programs are disabled", 1, &[("fs.suid_dumpable", "0")]),
    (
        "3.1.1",
        "Ensure packet redirect sending is disabled",
        2,
        &[("net.ipv4.conf.all.send_redirects", "0"), ("net.ipv4.conf.default.send_redirects", "0")],
    ),
    (
        "3.2.2",
        "Ensure ICMP redirects are not accepted",
        2,
        &[
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.conf.default.accept_redirects", "0"),
            ("net.ipv6.conf.all.accept_redirects", "0"),
            ("net.ipv6.conf.default.accept_redirects", "0"),
        ],
    ),
    (
        "3.2.3",
        "Ensure secure ICMP redirects are not accepted",
        2,
        &[("net.ipv4.conf.all.secure_redirects", "0"), ("net.ipv4.conf.default.secure_redirects", "0")],
    ),
    (
        "3.2.4",
        "Ensure suspicious packets are logged",
        2,
        &[("net.ipv4.conf.all.log_martians", "1"), ("net.ipv4.conf.default.log_martians", "1")],
    ),
    (
        "3.2.5",
        "Ensure broadcast ICMP requests are ignored",
        1,
        &[("net.ipv4.icmp_echo_ignore_broadcasts", "1")],
    ),
    (
        "3.2.6",
        "Ensure bogus ICMP responses are ignored",
        1,
        &[("net.ipv4.icmp_ignore_bogus_error_responses", "1")],
    ),
    ("3.2.7", "Ensure TCP SYN cookies are enabled", 1, &[("net.ipv4.tcp_syncookies", "1")]),
];

fn sysctl_check(sys: &System, keys: &[(&str, &str)]) -> (Status, String) {
    let mut found = Vec::new();
    let mut status = Status::Pass;
    for (key, want) in keys {
        match sys.sysctl(key) {
            Ok(v) if v == *want => found.push(format!("{key}={v}")),
            Ok(v) => {
                found.push(format!("{key}={v} (want {want})"));
                status = Status::Fail;
            }
            Err(e) => return (Status::Skip, e),
        }
    }
    (status, found.join(", "))
}

fn selinux(sys: &System) -> (Status, String) {
    match sys.read("/sys/fs/selinux/enforce") {
        Ok(v) if v == "1" => (Status::Pass, "enforcing".into()),
        Ok(v) => (Status::Fail, format!("enforce={v} (permissive)")),
        Err(e) => (Status::Fail, format!("SELinux is not enabled ({e})")),
    }
}

fn lockdown(sys: &System) -> (Status, String) {
    // "none [integrity] confidentiality": the bracketed word is the level.
    match sys.read("/sys/kernel/security/lockdown") {
        Ok(v) => {
            let level =
                v.split_whitespace().find(|w| w.starts_with('[')).unwrap_or("").trim_matches(['[', ']']);
            match level {
                "integrity" | "confidentiality" => (Status::Pass, format!("lockdown {level}")),
                other => (Status::Fail, format!("lockdown {other:?}")),
            }
        }
        Err(e) => (Status::Skip, e),
    }
}

/// The mount of `target` in mountinfo: (source, options incl. super options).
fn mount_of(sys: &System, target: &str) -> Result<Option<(String, String)>, String> {
    let text = sys.read("/proc/self/mountinfo")?;
    // The last line for a mount point wins (the one on top).
    Ok(text
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            (f.get(4) == Some(&target)).then(|| {
                (
                    r.get(1).unwrap_or(&"").to_string(),
                    format!("{},{}", f.get(5).unwrap_or(&""), r.get(2).unwrap_or(&"")),
                )
            })
        })
        .next_back())
}

fn verity_root(sys: &System) -> (Status, String) {
    let (source, opts) = match mount_of(sys, "/") {
        Ok(Some(m)) => m,
        Ok(None) => return (Status::Fail, "/ is not in the mount table".into()),
        Err(e) => return (Status::Skip, e),
    };
    let ro = opts.split(',').any(|o| o == "ro");
    let on_dm = source.starts_with("/dev/dm-") || source.starts_with("/dev/mapper/");
    let verdict = if sys.root == Path::new("/") {
        crate::sys::dm::status(crate::boot::VERITY_NAME).ok().and_then(|s| s.first().cloned())
    } else {
        sys.read("/verity-status").ok()
    };
    let detail = format!(
        "/ from {source} ({}), dm-verity status {}",
        if ro { "ro" } else { "rw" },
        verdict.as_deref().unwrap_or("unknown")
    );
    if ro && on_dm && verdict.as_deref() == Some("V") {
        (Status::Pass, detail)
    } else {
        (Status::Fail, detail)
    }
}

fn mount_options(sys: &System, target: &str, want: &[&str]) -> (Status, String) {
    match mount_of(sys, target) {
        Ok(Some((_, opts))) => {
            let missing: Vec<&str> =
                want.iter().copied().filter(|w| !opts.split(',').any(|o| o == *w)).collect();
            if missing.is_empty() {
                (Status::Pass, format!("{target}: {}", want.join(",")))
            } else {
                (Status::Fail, format!("{target} lacks {}", missing.join(",")))
            }
        }
        Ok(None) => (Status::Fail, format!("{target} is not a separate mount")),
        Err(e) => (Status::Skip, e),
    }
}

/// Files and directories writable by everyone under `dirs` (sticky directories excepted).
fn world_writable(sys: &System, dirs: &[&str]) -> (Status, String) {
    let mut found = Vec::new();
    let mut visited = 0usize;
    for d in dirs {
        let top = sys.path(d);
        let Ok(meta) = fs::symlink_metadata(&top) else { continue };
        let dev = meta.dev();
        let mut stack = vec![top];
        while let Some(p) = stack.pop() {
            visited += 1;
            if visited > MAX_SCAN {
                return (Status::Skip, format!("more than {MAX_SCAN} entries under {}", dirs.join(" ")));
            }
            let Ok(m) = fs::symlink_metadata(&p) else { continue };
            if m.file_type().is_symlink() || m.dev() != dev {
                continue;
            }
            let mode = m.mode();
            if mode & 0o002 != 0 && !(m.is_dir() && mode & 0o1000 != 0) {
                found
                    .push(p.strip_prefix(&sys.root).map(|r| format!("/{}", r.display())).unwrap_or_default());
            }
            if m.is_dir() {
                if let Ok(rd) = fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            }
        }
    }
    if found.is_empty() {
        (Status::Pass, format!("none in {} ({visited} entries)", dirs.join(" ")))
    } else {
        found.sort();
        found.truncate(10);
        (Status::Fail, format!("world-writable: {}", found.join(" ")))
    }
}

/// Run every check of `level` (1: level 1 only; 2: both).
pub fn cis(sys: &System, level: u8) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut add = |id, title, lvl, (status, detail): (Status, String)| {
        if lvl <= level {
            out.push(Outcome { id, title, level: lvl, status, detail });
        }
    };
    add("1.3.1", "Ensure dm-verity is configured (root read-only and verified)", 1, verity_root(sys));
    for (id, title, lvl, keys) in SYSCTLS {
        add(id, title, *lvl, sysctl_check(sys, keys));
    }
    add("1.5.1", "Ensure SELinux is configured and enforcing", 1, selinux(sys));
    add("1.5.6", "Ensure kernel lockdown is active", 2, lockdown(sys));
    add(
        "1.1.1",
        "Ensure /tmp is mounted nosuid and nodev",
        1,
        mount_options(sys, "/tmp", &["nosuid", "nodev"]),
    );
    add(
        "1.1.2",
        "Ensure /dev/shm is mounted nosuid and nodev",
        1,
        mount_options(sys, "/dev/shm", &["nosuid", "nodev"]),
    );
    add(
        "6.1.1",
        "Ensure no world-writable files in system directories",
        1,
        world_writable(sys, &["/usr", "/etc"]),
    );
    out.sort_by_key(|o| natural(o.id));
    out
}

fn natural(id: &str) -> Vec<u32> {
    id.split('.').map(|n| n.parse().unwrap_or(0)).collect()
}

fn count(results: &[Outcome], s: Status) -> usize {
    results.iter().filter(|r| r.status == s).count()
}

pub fn json(results: &[Outcome], level: u8) -> Value {
    let status = if count(results, Status::Fail) > 0 { "FAIL" } else { "PASS" };
    json!({
        "name": "CIS Bottlerocket Benchmark (the items that apply to Berth)",
        "version": "v1.0.0",
        "level": level,
        "status": status,
        "passed": count(results, Status::Pass),
        "failed": count(results, Status::Fail),
        "skipped": count(results, Status::Skip),
        "total": results.len(),
        "results": results.iter().map(|r| json!({
            "id": r.id, "title": r.title, "level": r.level, "status": r.status.as_str(), "detail": r.detail,
        })).collect::<Vec<_>>(),
    })
}

pub fn text(results: &[Outcome], level: u8) -> String {
    let mut s = format!(
        "Benchmark name:  CIS Bottlerocket Benchmark (the items that apply to Berth)\n\
         Version:         v1.0.0\nBenchmark level: {level}\n\n"
    );
    for r in results {
        s.push_str(&format!("[{}] {:<7} {} ({})\n", r.status.as_str(), r.id, r.title, r.detail));
    }
    s.push_str(&format!(
        "\nPassed:          {}\nFailed:          {}\nSkipped:         {}\nTotal checks:    {}\n",
        count(results, Status::Pass),
        count(results, Status::Fail),
        count(results, Status::Skip),
        results.len()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, p: &str, text: &str) {
        let path = root.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn checks_read_the_system_and_a_weakened_setting_fails() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("berth-cis-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (_, _, _, keys) in SYSCTLS {
            for (k, v) in *keys {
                put(&root, &format!("proc/sys/{}", k.replace('.', "/")), &format!("{v}\n"));
            }
        }
        put(&root, "sys/fs/selinux/enforce", "1");
        put(&root, "sys/kernel/security/lockdown", "none [integrity] confidentiality\n");
        put(&root, "verity-status", "V");
        put(
            &root,
            "proc/self/mountinfo",
            "20 1 254:0 / / ro,relatime - ext4 /dev/dm-0 ro\n\
             21 20 0:5 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw,mode=1777\n\
             22 20 0:6 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw\n",
        );
        put(&root, "usr/bin/tool", "x");
        fs::create_dir_all(root.join("etc/sticky")).unwrap();
        fs::set_permissions(root.join("etc/sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
        let results = cis(&System { root: root.clone() }, 2);
        let bad: Vec<_> = results.iter().filter(|r| r.status != Status::Pass).collect();
        assert!(bad.is_empty(), "{bad:?}");
        assert!(json(&results, 2)["status"] == "PASS");
        let level1 = cis(&System { root: root.clone() }, 1);
        assert!(level1.len() < results.len() && level1.iter().all(|r| r.level == 1));

        // Weaken things one by one: the matching check flips.
        put(&root, "proc/sys/net/ipv4/conf/all/send_redirects", "1");
        put(&root, "sys/fs/selinux/enforce", "0");
        put(&root, "usr/bin/open", "x");
        fs::set_permissions(root.join("usr/bin/open"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::remove_file(root.join("proc/sys/kernel/dmesg_restrict")).unwrap();
        let results = cis(&System { root: root.clone() }, 2);
        let status = |id: &str| results.iter().find(|r| r.id == id).unwrap().clone();
        assert_eq!(status("3.1.1").status, Status::Fail);
        assert!(status("3.1.1").detail.contains("net.ipv4.conf.all.send_redirects=1 (want 0)"));
        assert_eq!(status("1.5.1").status, Status::Fail);
        assert_eq!(status("6.1.1").status, Status::Fail);
        assert!(status("6.1.1").detail.contains("/usr/bin/open"), "{}", status("6.1.1").detail);
        assert_eq!(status("1.5.2").status, Status::Skip, "unreadable is a skip, not a pass");
        let t = text(&results, 2);
        assert!(t.contains("[FAIL] 3.1.1") && t.contains("Failed:          3"), "{t}");
        fs::remove_dir_all(&root).unwrap();
    }
}
