//! `berth host-container NAME SOURCE SUPERPOWERED`: the process the supervisor runs for a host
//! container (service `host-containers@NAME`). It pulls SOURCE through containerd (`ctr`, in
//! the `berth` namespace), removes what a previous run may have left, and runs the container
//! in the foreground, so its output is the service's output and its exit the service's exit.
//!
//! Every host container gets the API socket at /run/api.sock and the host's network.
//! Superpowered ones also get the host's PID namespace, privileges, and the host's `/` at
//! `/.berth/rootfs`; the others run with containerd's default confinement (own PID namespace,
//! default capabilities and seccomp profile, no host filesystem).
//!
//! On SIGTERM (the supervisor stopping it) the container's task is killed through containerd,
//! so nothing is left running; a container's init often ignores SIGTERM.
//!
//! Registries are HTTPS; a registry given by a private or loopback IP address (a test or lab
//! registry, e.g. 10.0.2.2:5000 from a QEMU guest) is retried over plain HTTP.
//!
//! Every host container has a persistent directory on the host, `/local/host-containers/NAME`,
//! which it sees at `/.bottlerocket/host-containers/current` and
//! `/.bottlerocket/host-containers/NAME` (Bottlerocket's places, which its admin and control
//! containers read). Before the container starts, `settings.host-containers.NAME.user-data`
//! (base64, passed by PID 1 in [`USER_DATA_ENV`]) is decoded into `user-data` there, mode 0600;
//! without the setting, a `user-data` left from before is removed. On EC2 the admin container's
//! user data holds the instance's SSH keys (`userdata::ec2`).

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::sys::SignalFd;

const CTR: &str = "/usr/bin/ctr";
const NAMESPACE: &str = "berth";

/// Where each host container's persistent directory is, on the host.
pub const PERSISTENT: &str = "/local/host-containers";
/// The environment variable that carries `settings.host-containers.NAME.user-data` (base64).
pub const USER_DATA_ENV: &str = "BERTH_HOST_CONTAINER_USER_DATA";

/// Make `dir` (mode 0700) and put the decoded user data in `dir/user-data` (mode 0600, written
/// whole or not at all), or remove it when there is none.
pub fn write_user_data(dir: &Path, base64: Option<&str>) -> Result<(), String> {
    let path = dir.join("user-data");
    let Some(text) = base64 else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", path.display())),
            _ => Ok(()),
        };
    };
    let data = crate::settings::kubelet::base64_decode(text).ok_or("the user data is not base64")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(".user-data.tmp");
    let write = || -> std::io::Result<()> {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

fn ctr(args: &[&str]) -> Command {
    let mut c = Command::new(CTR);
    c.args(["--namespace", NAMESPACE]).args(args);
    c
}

/// Whether the registry part of `source` is a private or loopback IPv4 address (or localhost).
fn plain_http_allowed(source: &str) -> bool {
    let registry = source.split('/').next().unwrap_or("");
    let host = registry.split(':').next().unwrap_or("");
    host == "localhost"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_private() || ip.is_loopback() || ip.is_link_local())
}

fn pull(source: &str) -> Result<(), String> {
    let run = |plain: bool| {
        let mut args = vec!["images", "pull"];
        if plain {
            args.push("--plain-http");
        }
        args.push(source);
        ctr(&args).stdout(Stdio::null()).output()
    };
    let out = run(false).map_err(|e| format!("{CTR}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    if plain_http_allowed(source) {
        let out = run(true).map_err(|e| format!("{CTR}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        return Err(format!("pulling {source}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Err(format!("pulling {source}: {}", String::from_utf8_lossy(&out.stderr).trim()))
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

fn run_args(name: &str, source: &str, superpowered: bool) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--rm", "--net-host"].iter().map(|s| s.to_string()).collect();
    a.push("--mount".into());
    a.push("type=bind,src=/run/api.sock,dst=/run/api.sock,options=rbind:rw".into());
    for dst in ["current", name] {
        a.push("--mount".into());
        a.push(format!(
            "type=bind,src={PERSISTENT}/{name},dst=/.bottlerocket/host-containers/{dst},options=rbind:rw"
        ));
    }
    if superpowered {
        a.push("--privileged".into());
        a.push("--with-ns".into());
        a.push("pid:/proc/1/ns/pid".into());
        a.push("--mount".into());
        a.push("type=bind,src=/,dst=/.berth/rootfs,options=rbind:rslave".into());
    }
    a.push(source.into());
    a.push(name.into());
    a
}

pub fn main(args: &[String]) -> i32 {
    let [name, source, superpowered] = args else {
        eprintln!("usage: berth host-container NAME SOURCE SUPERPOWERED(0|1)");
        return 2;
    };
    let signals = match SignalFd::new(&[libc::SIGTERM, libc::SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("host-container {name}: signalfd: {e}");
            return 1;
        }
    };
    let dir = Path::new(PERSISTENT).join(name);
    let user_data = std::env::var(USER_DATA_ENV).ok();
    if let Err(e) = write_user_data(&dir, user_data.as_deref()) {
        eprintln!("host-container {name}: its user data: {e}");
        return 1;
    }
    if let Err(e) = pull(source) {
        eprintln!("host-container {name}: {e}");
        return 1;
    }
    clean(name);
    let args = run_args(name, source, superpowered == "1");
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
            clean(name);
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
    fn plain_http_only_for_private_registries() {
        for (src, ok) in [
            ("10.0.2.2:5000/berth-test/busybox:1", true),
            ("127.0.0.1:5000/x:1", true),
            ("localhost:5000/x", true),
            ("192.168.1.10/x", true),
            ("docker.io/library/busybox:1", false),
            ("public.ecr.aws/bottlerocket/admin:v1", false),
            ("8.8.8.8:5000/x", false),
        ] {
            assert_eq!(plain_http_allowed(src), ok, "{src}");
        }
    }

    #[test]
    fn superpowered_containers_get_the_host() {
        let plain = run_args("admin", "r/a:1", false).join(" ");
        assert!(plain.contains("dst=/run/api.sock") && !plain.contains("--privileged"), "{plain}");
        assert!(!plain.contains("pid:/proc/1/ns/pid"));
        let sp = run_args("admin", "r/a:1", true).join(" ");
        for want in ["--privileged", "pid:/proc/1/ns/pid", "dst=/.berth/rootfs", "dst=/run/api.sock"] {
            assert!(sp.contains(want), "{want} missing: {sp}");
        }
        assert!(sp.ends_with("r/a:1 admin"));
        for want in [
            "src=/local/host-containers/admin,dst=/.bottlerocket/host-containers/current,",
            "src=/local/host-containers/admin,dst=/.bottlerocket/host-containers/admin,",
        ] {
            assert!(plain.contains(want) && sp.contains(want), "{want} missing: {plain}");
        }
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
