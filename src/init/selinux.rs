//! SELinux in stage 2: labels for what PID 1 makes at run time, and the denials the kernel
//! reports.
//!
//! Stage 1 loaded the policy (`boot::selinux`) and the exec of `/sbin/init` put PID 1 in
//! init_t. The phase here, before anything writes to /etc, /run, /local or /var/lib/berth:
//! - labels the roots of PID 1's tmpfs mounts (/etc etc_t, /run run_t, /tmp and /dev/shm
//!   tmp_t); what is made in them later inherits the label or gets it from a type transition
//!   in the policy (`/run/api.sock` is api_socket_t, containerd's directories runtime_state_t);
//! - relabels DATA (/local) and PRIVATE (/var/lib/berth) when their root does not carry the
//!   label `file_contexts` gives it: on first boot (mkfs.ext4 writes no labels), after a boot
//!   without a policy, or when the policy changed their labels. Only the `PATH` and
//!   `PATH(/.*)?` lines of `file_contexts` are used (the most specific wins); the root is
//!   labelled last, so a relabel cut short runs again at the next boot;
//! - links /etc/selinux to the policy's tree in the verified root, which is where container
//!   runtimes (go-selinux in containerd's CRI and runc) look for it;
//! - starts the `avc` task: it reads the kernel log (/dev/kmsg, from its oldest record, so
//!   denials of the early boot count too) and counts every AVC denial, keeping the newest
//!   [`MAX_RECENT`] for `GET /selinux`. The kernel prints audit records it cannot hand to an
//!   audit daemon (Berth runs none) at most `printk_ratelimit_burst` per 5 s; PID 1 raises
//!   that to [`RATELIMIT_BURST`], and the records the kernel still drops are counted from its
//!   "callbacks suppressed" lines, so the count never reads low in silence.
//!
//! Every role PID 1 plays in-process (settings, API, supervisor, updater, network, time)
//! shares init_t: they are threads of one process in one address space, so separate domains
//! would separate nothing. The children berth starts as itself (`berth host-container`,
//! `berth selftest`) stay in init_t too: they are the same verified binary. What leaves init_t
//! is what runs other code: containerd and ctr (runtime_t, by their files' label) and
//! containers (labelled by CRI or by berth's runc wrapper, `supervisor::runc`).

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use log::{info, warn};
use serde_json::{json, Value};

use super::Ctx;
use crate::boot::selinux::{self as sel, State};
use crate::boot::BootError;

/// The policy's tree in the verified root (config, policy, contexts).
pub const TREE: &str = "/usr/share/berth/selinux";
const FILE_CONTEXTS: &str = "/usr/share/berth/selinux/berth/contexts/files/file_contexts";
const XATTR: &str = "security.selinux";
/// Denials kept for `GET /selinux` (each clipped to [`MAX_TEXT`] bytes).
pub const MAX_RECENT: usize = 64;
const MAX_TEXT: usize = 1024;
/// Audit records the kernel may print per 5 s before it drops some (default 10).
const RATELIMIT_BURST: &str = "200";
/// The label of the host's /dev/null.
const NULL_DEVICE: &str = "system_u:object_r:null_device_t:s0";
/// The labels of PID 1's tmpfs mount roots.
const TMPFS_ROOTS: &[(&str, &str)] = &[
    ("/etc", "system_u:object_r:etc_t:s0"),
    ("/run", "system_u:object_r:run_t:s0"),
    ("/tmp", "system_u:object_r:tmp_t:s0"),
    ("/dev/shm", "system_u:object_r:tmp_t:s0"),
];

static STATE: OnceLock<State> = OnceLock::new();
static DENIALS: Mutex<Denials> = Mutex::new(Denials { count: 0, suppressed: 0, recent: VecDeque::new() });

#[derive(Debug, Default)]
struct Denials {
    count: u64,
    suppressed: u64,
    recent: VecDeque<Value>,
}

fn denials() -> std::sync::MutexGuard<'static, Denials> {
    DENIALS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stage 2 phase (see the module docs).
pub fn setup(ctx: &mut Ctx) -> Result<(), BootError> {
    let state = ctx.handoff.selinux.clone();
    let _ = STATE.set(state.clone());
    // securityfs: the kernel's lockdown level (settings.kernel.lockdown) lives there.
    let sec = Path::new("/sys/kernel/security");
    if !crate::boot::mounts::is_mountpoint(sec) {
        let flags = crate::sys::MS_NOSUID | crate::sys::MS_NODEV | crate::sys::MS_NOEXEC;
        if let Err(e) = crate::sys::mount(Some("securityfs"), sec, Some("securityfs"), flags, None) {
            warn!("mount securityfs on {}: {e}", sec.display());
        }
    }
    if state.policy.is_none() {
        warn!(
            "SELinux: no policy loaded ({}); nothing to label",
            state.error.as_deref().unwrap_or(&state.mode)
        );
        return Ok(());
    }
    for (dir, context) in TMPFS_ROOTS {
        // /run holds what stage 1 made before the policy came (boot.toml): label it all.
        let r = if *dir == "/run" {
            relabel_tree(Path::new(dir), &[], context).map(drop)
        } else {
            set_label(Path::new(dir), context)
        };
        if let Err(e) = r {
            return Err(BootError::Selinux { error: format!("label {dir} {context}: {e}") });
        }
    }
    // The host's /dev/null: what a process started by the runtime (a CRI ExecSync) inherits as
    // stdin; containers may use it, not the other device nodes (device_t).
    if let Err(e) = set_label(Path::new("/dev/null"), NULL_DEVICE) {
        return Err(BootError::Selinux { error: format!("label /dev/null {NULL_DEVICE}: {e}") });
    }
    let rules = fs::read_to_string(FILE_CONTEXTS)
        .map(|t| parse_rules(&t))
        .map_err(|e| BootError::Selinux { error: format!("read {FILE_CONTEXTS}: {e}") })?;
    for root in [super::LOCAL, super::PRIVATE] {
        relabel_if_needed(ctx, Path::new(root), &rules)?;
    }
    let link = Path::new("/etc/selinux");
    if fs::symlink_metadata(link).is_err() {
        std::os::unix::fs::symlink(TREE, link).map_err(BootError::io("symlink", link))?;
    }
    let _ = fs::write("/proc/sys/kernel/printk_ratelimit_burst", RATELIMIT_BURST);
    ctx.tasks.add("avc", || super::tasks::thread("avc", 64 * 1024, watch_kmsg));
    info!("SELinux: {} with {}", state.mode, state.policy.as_deref().unwrap_or("no policy"));
    Ok(())
}

/// Relabel the partition mounted at `root` when its root's label is not what the rules say.
fn relabel_if_needed(ctx: &mut Ctx, root: &Path, rules: &[Rule]) -> Result<(), BootError> {
    let Some(want) = context_for(rules, root) else {
        return Err(BootError::Selinux { error: format!("file_contexts gives {} no label", root.display()) });
    };
    if get_label(root).as_deref() == Some(want) {
        return Ok(());
    }
    let t = std::time::Instant::now();
    match relabel_tree(root, rules, want) {
        Ok(n) => {
            info!("SELinux: relabelled {} ({n} files) in {} ms", root.display(), t.elapsed().as_millis());
            Ok(())
        }
        Err(e) => ctx.degrade(
            BootError::Selinux { error: format!("relabel {}: {e}", root.display()) },
            "its files keep their old labels",
        ),
    }
}

/// `security.selinux` of `path` (not following a symlink), without its trailing NUL.
pub fn get_label(path: &Path) -> Option<String> {
    let mut buf = [0u8; 256];
    let n = rustix::fs::lgetxattr(path, XATTR, &mut buf).ok()?;
    let s = String::from_utf8_lossy(&buf[..n.min(buf.len())]).trim_end_matches('\0').to_string();
    Some(s)
}

/// Set `security.selinux` of `path` (not following a symlink) unless it has that label.
pub fn set_label(path: &Path, context: &str) -> std::io::Result<()> {
    if get_label(path).as_deref() == Some(context) {
        return Ok(());
    }
    rustix::fs::lsetxattr(path, XATTR, context.as_bytes(), rustix::fs::XattrFlags::empty())
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

/// Label everything under `root` on its filesystem (mounts below are left alone) by `rules`,
/// `root_context` for anything no rule names; `root` itself last. Returns the files labelled.
fn relabel_tree(root: &Path, rules: &[Rule], root_context: &str) -> std::io::Result<u64> {
    let dev = fs::symlink_metadata(root)?.dev();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut n = 0u64;
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            let md = fs::symlink_metadata(&p)?;
            if md.dev() != dev {
                continue;
            }
            set_label(&p, context_for(rules, &p).unwrap_or(root_context))?;
            n += 1;
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    set_label(root, root_context)?;
    Ok(n + 1)
}

/// One `file_contexts` line PID 1 can apply without a regex engine: a literal path, or a
/// literal path and everything below it (`PATH(/.*)?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    pub tree: bool,
    pub context: String,
}

/// The rules PID 1 understands in `file_contexts` text; other lines (real regexes) are skipped.
pub fn parse_rules(text: &str) -> Vec<Rule> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (re, context) = (f.first()?, f.last()?);
            if f.len() < 2 || re.starts_with('#') {
                return None;
            }
            let (lit, tree) = match re.strip_suffix("(/.*)?") {
                Some(l) => (l, true),
                None => (*re, false),
            };
            let path = literal(lit)?;
            Some(Rule { path, tree, context: context.to_string() })
        })
        .collect()
}

/// A regex that is a plain path (`\.` for a dot), unescaped; None if it has any other syntax.
fn literal(re: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = re.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '.' => out.push('.'),
                _ => return None,
            },
            c if c.is_ascii_alphanumeric() || "/_-".contains(c) => out.push(c),
            _ => return None,
        }
    }
    out.starts_with('/').then_some(out)
}

/// The context of the most specific rule for `path`.
pub fn context_for<'a>(rules: &'a [Rule], path: &Path) -> Option<&'a str> {
    let p = path.to_str()?;
    rules
        .iter()
        .filter(|r| {
            p == r.path || (r.tree && p.strip_prefix(&r.path).is_some_and(|rest| rest.starts_with('/')))
        })
        .max_by_key(|r| (r.path.len(), !r.tree))
        .map(|r| r.context.as_str())
}

// ---- denials ---------------------------------------------------------------------------------

/// The `avc` task: read the kernel log for good, counting AVC denials.
fn watch_kmsg() -> super::tasks::Outcome {
    let mut f = fs::File::open("/dev/kmsg").map_err(|e| format!("open /dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Err("/dev/kmsg ended".into()),
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if let Some((_, msg)) = record.split_once(';') {
                    note_line(msg.lines().next().unwrap_or(""));
                }
            }
            // Records overwritten before we read them: go on from the oldest left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read /dev/kmsg: {e}")),
        }
    }
}

/// Account for one kernel log message.
fn note_line(msg: &str) {
    if let Some(d) = parse_denial(msg) {
        let mut s = denials();
        s.count += 1;
        if s.recent.len() == MAX_RECENT {
            s.recent.pop_front();
        }
        s.recent.push_back(d);
    } else if let Some(n) = suppressed(msg) {
        denials().suppressed += n;
    }
}

/// An AVC denial in a kernel log message (`audit: type=1400 audit(...): avc:  denied  { read }
/// for pid=.. comm="cat" name="x" ... scontext=... tcontext=... tclass=dir permissive=0`).
pub fn parse_denial(msg: &str) -> Option<Value> {
    let at = msg.find("avc:")?;
    let rest = msg[at + 4..].trim_start();
    let rest = rest.strip_prefix("denied")?;
    let perms: Vec<&str> = rest
        .split_once('{')
        .and_then(|(_, r)| r.split_once('}'))
        .map(|(p, _)| p.split_whitespace().collect())
        .unwrap_or_default();
    let field = |key: &str| -> Option<String> {
        let pat = format!(" {key}=");
        let start = msg.find(&pat)? + pat.len();
        let v = &msg[start..];
        let v = match v.strip_prefix('"') {
            Some(q) => q.split('"').next().unwrap_or(""),
            None => v.split_whitespace().next().unwrap_or(""),
        };
        Some(v.to_string())
    };
    let mut text = msg.to_string();
    if text.len() > MAX_TEXT {
        let end = (0..=MAX_TEXT).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
    Some(json!({
        "perms": perms,
        "comm": field("comm"),
        "name": field("name"),
        "scontext": field("scontext"),
        "tcontext": field("tcontext"),
        "tclass": field("tclass"),
        "permissive": field("permissive").as_deref() == Some("1"),
        "text": text,
    }))
}

/// `kauditd_printk_skb: N callbacks suppressed`: audit records the kernel did not print.
fn suppressed(msg: &str) -> Option<u64> {
    let rest = msg.strip_prefix("kauditd_printk_skb: ")?;
    rest.strip_suffix(" callbacks suppressed")?.trim().parse().ok()
}

/// For `GET /selinux`.
pub fn status() -> Value {
    let state = STATE.get().cloned().unwrap_or_else(|| State::off("not started by stage 1 (dev mode?)"));
    let d = denials();
    json!({
        "mode": state.mode,
        "enforcing": sel::enforcing_now(),
        "policy": state.policy,
        "error": state.error,
        "context": sel::current_context(),
        "denials": d.count,
        "suppressed": d.suppressed,
        "recent_denials": d.recent,
    })
}

/// For `GET /os`: the mode and the number of denials.
pub fn summary() -> Value {
    let mode = STATE.get().map(|s| s.mode.clone()).unwrap_or_else(|| "off".into());
    let d = denials();
    json!({"mode": mode, "denials": d.count + d.suppressed})
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC: &str = "/.*\tsystem_u:object_r:os_t:s0\n\
        /local(/.*)?\tsystem_u:object_r:local_t:s0\n\
        /var/lib/berth(/.*)?\tsystem_u:object_r:private_t:s0\n\
        /local/var/lib/containerd(/.*)?\tsystem_u:object_r:runtime_state_t:s0\n\
        /local/var/lib/containerd/io\\.containerd\\.snapshotter\\.v1\\.overlayfs/snapshots(/.*)?\tsystem_u:object_r:container_file_t:s0\n\
        /sbin/init\t--\tsystem_u:object_r:init_exec_t:s0\n";

    #[test]
    fn file_contexts_rules_most_specific_wins() {
        let rules = parse_rules(FC);
        assert_eq!(rules.len(), 5, "the /.* regex is not a rule PID 1 applies: {rules:?}");
        for (path, want) in [
            ("/local", Some("local_t")),
            ("/local/var/lib/x", Some("local_t")),
            ("/localx", None),
            ("/local/var/lib/containerd", Some("runtime_state_t")),
            ("/local/var/lib/containerd/io.containerd.content.v1.content/blobs", Some("runtime_state_t")),
            (
                "/local/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/3/fs/bin",
                Some("container_file_t"),
            ),
            ("/var/lib/berth/datastore/live.json", Some("private_t")),
            ("/sbin/init", Some("init_exec_t")),
            ("/sbin/init2", None),
        ] {
            let got = context_for(&rules, Path::new(path)).map(|c| c.split(':').nth(2).unwrap());
            assert_eq!(got, want, "{path}");
        }
    }

    /// Compile policy/ as the image build does (policy/build, secilc) into a temp dir.
    fn build_policy(name: &str, extra: Option<&str>) -> Result<PathBuf, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let d = std::env::temp_dir().join(format!("berth-policy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let mut src = root.join("policy");
        if let Some(rule) = extra {
            // A copy of policy/ with one more rule.
            src = d.join("src");
            fs::create_dir_all(&src).unwrap();
            for e in fs::read_dir(root.join("policy")).unwrap() {
                let e = e.unwrap();
                fs::copy(e.path(), src.join(e.file_name())).unwrap();
            }
            let mut rules = fs::read_to_string(src.join("rules.cil")).unwrap();
            rules.push_str(rule);
            fs::write(src.join("rules.cil"), rules).unwrap();
        }
        let out = std::process::Command::new(src.join("build"))
            .arg(d.join("out"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(d.join("out"))
    }

    #[test]
    fn the_policy_compiles_and_file_contexts_covers_the_root() {
        if which_secilc().is_none() {
            return crate::testing::cannot_run(
                "init::selinux::tests::the_policy_compiles",
                "secilc is not installed",
            );
        }
        let out = build_policy("ok", None).unwrap();
        assert!(fs::metadata(out.join("policy")).unwrap().len() > 10_000);
        let fc = fs::read_to_string(out.join("file_contexts")).unwrap();
        // Everything in the root is labelled (the catch-all), the entry points by name.
        assert!(fc.lines().any(|l| l.starts_with("/.*\t") && l.ends_with(":os_t:s0")), "{fc}");
        let rules = parse_rules(&fc);
        let ty =
            |p: &str| context_for(&rules, Path::new(p)).map(|c| c.split(':').nth(2).unwrap().to_string());
        for (path, want) in [
            ("/sbin/init", "init_exec_t"),
            ("/usr/bin/containerd", "runtime_exec_t"),
            ("/usr/bin/containerd-shim-runc-v2", "runtime_exec_t"),
            ("/usr/bin/ctr", "runtime_exec_t"),
            ("/usr/sbin/runc", "runtime_exec_t"),
            (super::super::LOCAL, "local_t"),
            (super::super::PRIVATE, "private_t"),
            ("/local/var/lib/containerd", "runtime_state_t"),
        ] {
            assert_eq!(ty(path).as_deref(), Some(want), "{path}");
        }
        // The tmpfs roots PID 1 labels name types the policy has.
        let types =
            fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policy/types.cil")).unwrap();
        for (_, ctx) in TMPFS_ROOTS {
            let t = ctx.split(':').nth(2).unwrap();
            assert!(types.contains(&format!("(type {t})")), "{t}");
        }
    }

    #[test]
    fn a_rule_that_breaks_a_guarantee_fails_the_build() {
        if which_secilc().is_none() {
            return crate::testing::cannot_run(
                "init::selinux::tests::a_rule_that_breaks",
                "secilc is not installed",
            );
        }
        let e = build_policy("never", Some("(allow container_t private_t (file (read)))\n")).unwrap_err();
        assert!(e.to_lowercase().contains("neverallow"), "{e}");
        let e = build_policy("typo", Some("(allow container_t no_such_t (file (read)))\n")).unwrap_err();
        assert!(!e.is_empty());
    }

    fn which_secilc() -> Option<()> {
        std::process::Command::new("secilc").arg("--help").output().ok().map(drop)
    }

    #[test]
    fn denials_are_parsed_and_other_lines_are_not() {
        let line = "audit: type=1400 audit(1700000000.123:45): avc:  denied  { read open } for  \
                    pid=412 comm=\"cat\" path=\"/host/etc/hostname\" dev=\"tmpfs\" ino=7 \
                    scontext=system_u:system_r:container_t:s0:c1,c2 tcontext=system_u:object_r:etc_t:s0 \
                    tclass=file permissive=0";
        let d = parse_denial(line).unwrap();
        assert_eq!(d["perms"], json!(["read", "open"]));
        assert_eq!(d["comm"], "cat");
        assert_eq!(d["scontext"], "system_u:system_r:container_t:s0:c1,c2");
        assert_eq!(d["tcontext"], "system_u:object_r:etc_t:s0");
        assert_eq!(d["tclass"], "file");
        assert_eq!(d["permissive"], false);
        assert!(
            parse_denial("audit: type=1400 audit(1.2:3): avc:  granted  { setenforce } for pid=1").is_none()
        );
        assert!(parse_denial("berth: ready version=0.1.0").is_none());
        assert_eq!(suppressed("kauditd_printk_skb: 17 callbacks suppressed"), Some(17));
        assert_eq!(suppressed("something else: 17 callbacks suppressed"), None);
        let long = format!("avc:  denied  {{ read }} for comm=\"{}\"", "x".repeat(5000));
        assert!(parse_denial(&long).unwrap()["text"].as_str().unwrap().len() <= MAX_TEXT);
    }

    #[test]
    fn the_count_is_kept_and_recent_denials_are_bounded() {
        let before = denials().count;
        for i in 0..(MAX_RECENT + 5) {
            note_line(&format!(
                "audit: type=1400 audit(1.2:{i}): avc:  denied  {{ write }} for pid={i} tclass=file"
            ));
        }
        note_line("kauditd_printk_skb: 3 callbacks suppressed");
        let d = denials();
        assert!(d.count >= before + MAX_RECENT as u64 + 5);
        assert!(d.recent.len() <= MAX_RECENT);
        assert!(d.suppressed >= 3);
    }
}
