//! `berth host-container NAME SOURCE SUPERPOWERED [PLAIN_HTTP]`: the process the supervisor runs
//! for a host container (service `host-containers@NAME`). It pulls SOURCE through containerd
//! (`ctr`, in the `berth` namespace), removes what a previous run may have left, and runs the
//! container in the foreground, so its output is the service's output and its exit the
//! service's exit.
//!
//! Every host container gets the API socket at /run/api.sock and the host's network, and runs
//! through berth's runc wrapper (`supervisor::runc`), which gives it its SELinux domain.
//! - Superpowered: super_t, privileged, the host's PID namespace and the host's `/` at
//!   `/.berth/rootfs`.
//! - Not superpowered: control_t with two MCS categories of its own (its files are its own;
//!   the host's are out of reach but for the API socket and /etc/hosts, /etc/resolv.conf), its
//!   own PID namespace, containerd's default seccomp profile, the capabilities in
//!   [`PLAIN_CAPS_DROPPED`] taken away, and limits ([`MEMORY_LIMIT`], [`PIDS_LIMIT`]).
//!
//! Each runs in its own cgroup, `/sys/fs/cgroup/host-containers/NAME`: a subtree of its own,
//! apart from the supervisor's service cgroups under `/sys/fs/cgroup/berth/` (ctr's default,
//! `/NAMESPACE/NAME`, would put a host container named `containerd` in containerd's cgroup).
//!
//! On SIGTERM (the supervisor stopping it: disabled, or removed from settings) the container's
//! task is killed through containerd, so nothing is left running; a container's init often
//! ignores SIGTERM.
//!
//! Registries are HTTPS. Plain HTTP is used only when PLAIN_HTTP is 1: the service sets it when
//! `settings.container-registry.mirrors` gives the source's registry an `http://` endpoint
//! (the registry is configured as insecure). A failed HTTPS pull is never retried over HTTP.
//! When `settings.container-registry.credentials` has a login for the source's registry, PID 1
//! passes it in [`PULL_LOGIN_ENV`] and the pull presents it (`ctr images pull --user`); an
//! `identitytoken` alone is for containerd's CRI pulls, not for host containers.
//!
//! Every host container has a persistent directory on the host, `/local/host-containers/NAME`,
//! which it sees at `/.bottlerocket/host-containers/current` and
//! `/.bottlerocket/host-containers/NAME` (Bottlerocket's places, which its admin and control
//! containers read). Before the container starts, `settings.host-containers.NAME.user-data`
//! (base64, passed by PID 1 in [`USER_DATA_ENV`]) is decoded into `user-data` there, mode 0600;
//! without the setting, a `user-data` left from before is removed. On EC2 the admin container's
//! user data holds the instance's SSH keys (`userdata::ec2`).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::sys::SignalFd;

const CTR: &str = "/usr/bin/ctr";
const NAMESPACE: &str = "berth";
/// Capabilities a plain host container does not get from containerd's default set (it keeps
/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE).
pub const PLAIN_CAPS_DROPPED: &[&str] =
    &["CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP", "CAP_SYS_CHROOT"];
/// memory.max of a plain host container: 512 MiB.
pub const MEMORY_LIMIT: u64 = 512 << 20;
/// pids.max of a plain host container.
pub const PIDS_LIMIT: u32 = 1024;

/// The environment variable that carries `settings.host-containers.NAME.user-data` (base64).
pub const USER_DATA_ENV: &str = "BERTH_HOST_CONTAINER_USER_DATA";
/// The environment variable through which PID 1 passes the login
/// `settings.container-registry.credentials` gives the source's registry (`user:password`).
pub const PULL_LOGIN_ENV: &str = "BERTH_HOST_CONTAINER_PULL_LOGIN";

/// Make `dir` (mode 0700) and put the decoded user data in `dir/user-data` (mode 0600, written
/// whole or not at all), or remove it when there is none.
pub fn write_user_data(dir: &Path, base64: Option<&str>) -> Result<(), String> {
    let path = dir.join("user-data");
    // The directory always exists: it is bound into the container whether or not it has user
    // data. (Under SELinux it is container_file_t: policy/rules.cil names the transition.)
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let Some(text) = base64 else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", path.display())),
            _ => Ok(()),
        };
    };
    let data = crate::settings::kubelet::base64_decode(text).ok_or("the user data is not base64")?;
    crate::settings::store::write_atomic_mode(&path, &data, 0o600).map_err(|e| e.to_string())
}

fn ctr(args: &[&str]) -> Command {
    let mut c = Command::new(CTR);
    c.args(["--namespace", NAMESPACE]).args(args);
    c
}

/// The registry (host[:port]) of an image reference.
pub fn registry_of(source: &str) -> &str {
    source.split('/').next().unwrap_or("")
}

fn pull_args<'a>(source: &'a str, plain_http: bool, login: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec!["images", "pull"];
    if plain_http {
        args.push("--plain-http");
    }
    if let Some(login) = login {
        args.extend(["--user", login]);
    }
    args.push(source);
    args
}

/// Pull over HTTPS, or over plain HTTP when the registry is configured as insecure; never
/// the one after the other.
fn pull(source: &str, plain_http: bool) -> Result<(), String> {
    let login = std::env::var(PULL_LOGIN_ENV).ok();
    let out = ctr(&pull_args(source, plain_http, login.as_deref()))
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{CTR}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let how = if plain_http { "plain HTTP (the registry is configured as insecure)" } else { "HTTPS" };
    Err(format!("pulling {source} over {how}: {}", String::from_utf8_lossy(&out.stderr).trim()))
}

/// Remove a task and container left by an earlier run that did not end cleanly.
fn clean(name: &str) {
    for args in [
        &["tasks", "kill", "--signal", "SIGKILL", name][..],
        &["tasks", "delete", "--force", name],
        &["containers", "delete", name],
    ] {
        let _ = ctr(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// What a container run by this module is: a host container (`settings.host-containers`) or a
/// bootstrap container (`settings.bootstrap-containers`, run to completion before the boot is
/// ready; see `init::bootstrap`). Each kind has its own containerd IDs, cgroups and persistent
/// directories, so a bootstrap container may share its name with a host container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Host,
    Bootstrap,
}

impl Kind {
    /// The settings group, which also names the cgroup parent and the persistent directories.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Host => "host-containers",
            Kind::Bootstrap => "bootstrap-containers",
        }
    }

    /// The containerd container ID (a host container's is its name, as before; a bootstrap
    /// container's has a dot, which no host container name has).
    pub fn id(self, name: &str) -> String {
        match self {
            Kind::Host => name.to_string(),
            Kind::Bootstrap => format!("bootstrap.{name}"),
        }
    }

    /// The container's persistent directory on the host.
    pub fn persistent(self, name: &str) -> std::path::PathBuf {
        Path::new("/local").join(self.group()).join(name)
    }
}

fn run_args(kind: Kind, name: &str, source: &str, superpowered: bool) -> Vec<String> {
    let (group, id) = (kind.group(), kind.id(name));
    let src = kind.persistent(name);
    let src = src.display();
    let mut a: Vec<String> = ["run", "--rm", "--net-host"].iter().map(|s| s.to_string()).collect();
    let mut opt = |k: &str, v: String| {
        a.push(k.into());
        a.push(v);
    };
    opt("--runc-binary", super::runc::WRAPPER.into());
    opt("--cgroup", format!("/{group}/{name}"));
    opt("--mount", "type=bind,src=/run/api.sock,dst=/run/api.sock,options=rbind:rw".into());
    for dst in ["current", name] {
        opt("--mount", format!("type=bind,src={src},dst=/.bottlerocket/{group}/{dst},options=rbind:rw"));
    }
    if superpowered {
        opt("--annotation", format!("{}=super", super::runc::LABEL_ANNOTATION));
        opt("--with-ns", "pid:/proc/1/ns/pid".into());
        opt("--mount", "type=bind,src=/,dst=/.berth/rootfs,options=rbind:rslave".into());
        a.push("--privileged".into());
    } else {
        opt("--annotation", format!("{}=control", super::runc::LABEL_ANNOTATION));
        opt("--annotation", format!("{}={PIDS_LIMIT}", super::runc::PIDS_ANNOTATION));
        opt("--memory-limit", MEMORY_LIMIT.to_string());
        for cap in PLAIN_CAPS_DROPPED {
            opt("--cap-drop", cap.to_string());
        }
        a.push("--seccomp".into());
    }
    a.push(source.into());
    a.push(id);
    a
}

pub fn main(args: &[String]) -> i32 {
    let (name, source, superpowered, plain_http) = match args {
        [n, s, sp] => (n, s, sp, false),
        [n, s, sp, plain] => (n, s, sp, plain == "1"),
        _ => {
            eprintln!("usage: berth host-container NAME SOURCE SUPERPOWERED(0|1) [PLAIN_HTTP(0|1)]");
            return 2;
        }
    };
    let user_data = std::env::var(USER_DATA_ENV).ok();
    run(Kind::Host, name, source, superpowered == "1", plain_http, user_data.as_deref())
}

/// Pull `source` and run it as container `name` of `kind` in the foreground until it exits
/// (or SIGTERM/SIGINT stops it); returns its exit status.
pub fn run(
    kind: Kind,
    name: &str,
    source: &str,
    superpowered: bool,
    plain_http: bool,
    user_data: Option<&str>,
) -> i32 {
    let signals = match SignalFd::new(&[libc::SIGTERM, libc::SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("host-container {name}: signalfd: {e}");
            return 1;
        }
    };
    let dir = kind.persistent(name);
    let id = kind.id(name);
    if let Err(e) = write_user_data(&dir, user_data) {
        eprintln!("host-container {name}: its user data: {e}");
        return 1;
    }
    if let Err(e) = pull(source, plain_http) {
        eprintln!("host-container {name}: {e}");
        return 1;
    }
    clean(&id);
    let args = run_args(kind, name, source, superpowered);
    let mut child = match ctr(&args.iter().map(String::as_str).collect::<Vec<_>>()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-container {name}: {CTR}: {e}");
            return 1;
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code().unwrap_or(1),
            Ok(None) => {}
            Err(e) => {
                eprintln!("host-container {name}: {e}");
                return 1;
            }
        }
        if let Ok(Some(sig)) = signals.wait(200) {
            eprintln!("host-container {name}: signal {sig}: stopping the container");
            clean(&id);
            // `ctr run --rm` returns once the task is gone.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return 0;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_when_configured_and_never_as_a_retry() {
        assert_eq!(pull_args("10.0.2.2:5000/x:1", false, None), ["images", "pull", "10.0.2.2:5000/x:1"]);
        assert_eq!(
            pull_args("10.0.2.2:5000/x:1", true, None),
            ["images", "pull", "--plain-http", "10.0.2.2:5000/x:1"]
        );
        assert_eq!(
            pull_args("r.example/x:1", false, Some("u:p")),
            ["images", "pull", "--user", "u:p", "r.example/x:1"]
        );
        assert_eq!(registry_of("10.0.2.2:5000/berth-test/busybox:1"), "10.0.2.2:5000");
        assert_eq!(registry_of("public.ecr.aws/bottlerocket/admin:v1"), "public.ecr.aws");
    }

    #[test]
    fn superpowered_containers_get_the_host_and_plain_ones_are_confined() {
        let plain = run_args(Kind::Host, "admin", "r/a:1", false).join(" ");
        assert!(plain.contains("dst=/run/api.sock") && !plain.contains("--privileged"), "{plain}");
        assert!(!plain.contains("pid:/proc/1/ns/pid"));
        for want in [
            "--runc-binary /usr/libexec/berth/runc",
            "--cgroup /host-containers/admin",
            "--annotation org.berth.selinux=control",
            "--annotation org.berth.pids-limit=1024",
            "--memory-limit 536870912",
            "--cap-drop CAP_NET_RAW",
            "--seccomp",
        ] {
            assert!(plain.contains(want), "{want} missing: {plain}");
        }
        let sp = run_args(Kind::Host, "admin", "r/a:1", true).join(" ");
        for want in [
            "--privileged",
            "pid:/proc/1/ns/pid",
            "dst=/.berth/rootfs",
            "dst=/run/api.sock",
            "--annotation org.berth.selinux=super",
            "--cgroup /host-containers/admin",
        ] {
            assert!(sp.contains(want), "{want} missing: {sp}");
        }
        assert!(!sp.contains("--seccomp") && !sp.contains("--cap-drop"), "{sp}");
        assert!(sp.ends_with("r/a:1 admin"));
        // A host container named like a service gets its own cgroup, not the service's.
        assert!(run_args(Kind::Host, "containerd", "r/a:1", false)
            .join(" ")
            .contains("--cgroup /host-containers/containerd"));
        for want in [
            "src=/local/host-containers/admin,dst=/.bottlerocket/host-containers/current,",
            "src=/local/host-containers/admin,dst=/.bottlerocket/host-containers/admin,",
        ] {
            assert!(plain.contains(want) && sp.contains(want), "{want} missing: {plain}");
        }
        // A bootstrap container named like a host container shares nothing with it.
        let b = run_args(Kind::Bootstrap, "admin", "r/a:1", true).join(" ");
        for want in [
            "--cgroup /bootstrap-containers/admin",
            "src=/local/bootstrap-containers/admin,dst=/.bottlerocket/bootstrap-containers/current,",
            "dst=/.berth/rootfs",
        ] {
            assert!(b.contains(want), "{want} missing: {b}");
        }
        assert!(b.ends_with("r/a:1 bootstrap.admin") && !b.contains("host-containers"), "{b}");
    }

    #[test]
    fn user_data_is_written_private_and_removed_when_unset() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("berth-hc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hc = dir.join("admin");
        write_user_data(&hc, Some("eyJzc2giOnt9fQ==")).unwrap();
        assert_eq!(std::fs::read_to_string(hc.join("user-data")).unwrap(), r#"{"ssh":{}}"#);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&hc), mode(&hc.join("user-data"))), (0o700, 0o600));
        assert!(write_user_data(&hc, Some("%%")).unwrap_err().contains("not base64"));
        assert!(hc.join("user-data").exists(), "a bad value leaves the old file");
        write_user_data(&hc, None).unwrap();
        assert!(!hc.join("user-data").exists());
        write_user_data(&hc, None).unwrap();
        let other = dir.join("control");
        write_user_data(&other, None).unwrap();
        assert!(
            other.is_dir() && !other.join("user-data").exists(),
            "the directory is made without user data too"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
