//! Turning settings into effects: configuration files rendered under /etc (a tmpfs, rendered
//! anew on every boot), the hostname, and sysctls written to /proc/sys.
//!
//! The effects on the running kernel go through [`Host`], so dev mode (`berth serve`) can
//! render the same files into its state directory while never changing the machine it runs on.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::kubelet;
use super::model::Settings;
use crate::http::tls;

/// What a setting group changes on the running system.
pub trait Host: Send + Sync {
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    fn write_sysctl(&self, key: &str, value: &str) -> io::Result<()>;
    /// What is in effect now (read back, for `GET /system/state`).
    fn hostname(&self) -> io::Result<String>;
    fn read_sysctl(&self, key: &str) -> io::Result<String>;
    /// Kernel lockdown (`settings.kernel.lockdown`), through securityfs.
    fn set_lockdown(&self, level: &str) -> io::Result<()>;
}

/// The real machine (PID 1).
pub struct RealHost;

/// `/proc/sys/` path of a dotted sysctl name. In a name with '/' the dots are literal
/// (`net/ipv4/conf/eth0.100/rp_filter`), as sysctl(8) has it.
pub fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') { key.to_string() } else { key.replace('.', "/") };
    Path::new("/proc/sys").join(rel)
}

impl Host for RealHost {
    fn set_hostname(&self, name: &str) -> io::Result<()> {
        crate::sys::sethostname(name)
    }

    fn write_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        fs::write(sysctl_path(key), format!("{value}\n"))
    }

    fn hostname(&self) -> io::Result<String> {
        fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim_end().to_string())
    }

    fn read_sysctl(&self, key: &str) -> io::Result<String> {
        fs::read_to_string(sysctl_path(key)).map(|s| s.trim_end().to_string())
    }

    fn set_lockdown(&self, level: &str) -> io::Result<()> {
        let file = Path::new(LOCKDOWN);
        // Already there (or higher: the kernel refuses to lower it, and says so).
        if fs::read_to_string(file)?.contains(&format!("[{level}]")) {
            return Ok(());
        }
        fs::write(file, level)
    }
}

/// The kernel's lockdown level in securityfs (PID 1 mounts securityfs in stage 1).
pub const LOCKDOWN: &str = "/sys/kernel/security/lockdown";

/// Dev mode: records what it would do under `dir` (`hostname`, `sysctl/<key>`).
pub struct RecordingHost {
    pub dir: PathBuf,
}

impl Host for RecordingHost {
    fn set_hostname(&self, name: &str) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::write(self.dir.join("hostname"), format!("{name}\n"))
    }

    fn write_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let d = self.dir.join("sysctl");
        fs::create_dir_all(&d)?;
        fs::write(d.join(key.replace('/', ".")), format!("{value}\n"))
    }

    fn hostname(&self) -> io::Result<String> {
        fs::read_to_string(self.dir.join("hostname")).map(|s| s.trim_end().to_string())
    }

    fn read_sysctl(&self, key: &str) -> io::Result<String> {
        fs::read_to_string(self.dir.join("sysctl").join(key.replace('/', ".")))
            .map(|s| s.trim_end().to_string())
    }

    fn set_lockdown(&self, level: &str) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::write(self.dir.join("lockdown"), format!("{level}\n"))
    }
}

/// A rendered configuration file and the setting groups it depends on.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigFile {
    pub path: &'static str,
    pub settings: &'static [&'static str],
}

/// Every file rendered from settings, by name (as `GET /configuration-files` lists them).
pub const CONFIG_FILES: &[(&str, ConfigFile)] = &[
    ("motd", ConfigFile { path: "motd", settings: &["motd"] }),
    ("hostname", ConfigFile { path: "hostname", settings: &["network"] }),
    ("hosts", ConfigFile { path: "hosts", settings: &["network"] }),
    ("sysctl", ConfigFile { path: "sysctl.d/90-berth.conf", settings: &["kernel"] }),
    ("ntp", ConfigFile { path: "ntp.conf", settings: &["ntp"] }),
    (
        "containerd",
        ConfigFile { path: "containerd/config.toml", settings: &["container-registry", "kubernetes"] },
    ),
    ("kubelet-config", ConfigFile { path: kubelet::CONFIG, settings: &["kubernetes"] }),
    ("kubelet-ca", ConfigFile { path: kubelet::CA, settings: &["kubernetes"] }),
    ("kubelet-bootstrap", ConfigFile { path: kubelet::BOOTSTRAP, settings: &["kubernetes"] }),
    ("ca-bundle", ConfigFile { path: tls::TRUST_BUNDLE_IN_ETC, settings: &["pki"] }),
];

/// The sandbox (pause) image kubelet's pods use unless
/// `settings.kubernetes.pod-infra-container-image` names another; containerd pulls it on first use.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.9";

fn containerd_config(s: &Settings) -> String {
    let mut out = String::from(
        "# Rendered by berth from settings; changes are lost at the next boot.\n\
         version = 2\n\
         root = \"/var/lib/containerd\"\n\
         state = \"/run/containerd\"\n\n\
         [grpc]\n\
         address = \"/run/containerd/containerd.sock\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\n",
    );
    let sandbox = s.kubernetes.as_ref().and_then(|k| k.pod_infra_container_image.as_deref());
    out.push_str(&format!("sandbox_image = {:?}\n", sandbox.unwrap_or(SANDBOX_IMAGE)));
    // Pods get container_t with two random categories (from /etc/selinux's lxc_contexts).
    out.push_str("enable_selinux = true\n\n");
    out.push_str(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         default_runtime_name = \"runc\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         runtime_type = \"io.containerd.runc.v2\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         BinaryName = \"/usr/sbin/runc\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         bin_dir = \"/usr/libexec/cni\"\n\
         conf_dir = \"/etc/cni/net.d\"\n",
    );
    let mirrors = s.container_registry.as_ref().and_then(|c| c.mirrors.clone()).unwrap_or_default();
    for m in mirrors {
        let endpoints: Vec<String> = m.endpoint.iter().map(|e| format!("{e:?}")).collect();
        out.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{:?}]\nendpoint = [{}]\n",
            m.registry,
            endpoints.join(", ")
        ));
    }
    out
}

pub const DEFAULT_HOSTNAME: &str = "berth";

fn hostname(s: &Settings) -> &str {
    s.network.as_ref().and_then(|n| n.hostname.as_deref()).unwrap_or(DEFAULT_HOSTNAME)
}

pub fn sysctls(s: &Settings) -> BTreeMap<String, String> {
    s.kernel.as_ref().and_then(|k| k.sysctl.clone()).unwrap_or_default()
}

/// The contents of configuration file `name` for `s`.
pub fn render_file(name: &str, s: &Settings) -> String {
    match name {
        "motd" => s.motd.as_deref().map(|m| format!("{}\n", m.trim_end_matches('\n'))).unwrap_or_default(),
        "hostname" => format!("{}\n", hostname(s)),
        "hosts" => {
            let h = hostname(s);
            format!("127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {h}\n")
        }
        "sysctl" => sysctls(s).iter().map(|(k, v)| format!("{k} = {v}\n")).collect(),
        "containerd" => containerd_config(s),
        // Empty while kubelet is not configured.
        "kubelet-config" => kubelet::configured(s)
            .map(|k| serde_json::to_string_pretty(&kubelet::config(k)).expect("JSON serializes"))
            .unwrap_or_default(),
        "kubelet-ca" => kubelet::configured(s)
            .and_then(|k| k.cluster_certificate.as_deref())
            .and_then(kubelet::base64_decode)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        "kubelet-bootstrap" => kubelet::configured(s).map(kubelet::bootstrap_kubeconfig).unwrap_or_default(),
        "ca-bundle" => trust_bundle(s, &fs::read(tls::IMAGE_BUNDLE).unwrap_or_default()),
        "ntp" => {
            let servers = s.ntp.as_ref().and_then(|n| n.time_servers.clone()).unwrap_or_default();
            servers.iter().map(|t| format!("server {t} iburst\n")).collect()
        }
        _ => String::new(),
    }
}

/// The trust bundle: the image's CAs (`image`, PEM) and `settings.pki`.
fn trust_bundle(s: &Settings, image: &[u8]) -> String {
    let bundles: Vec<tls::PkiBundle<'_>> = s
        .pki
        .iter()
        .flatten()
        .filter_map(|(name, b)| {
            let pem = kubelet::base64_decode(b.data.as_deref()?)?;
            Some(tls::PkiBundle { name, pem, trusted: b.trusted.unwrap_or(false) })
        })
        .collect();
    tls::trust_bundle(image, &bundles)
}

/// Which top-level setting groups `changed` keys (`network.hostname`, `motd`) touch.
fn groups(changed: &[String]) -> Vec<&str> {
    let mut g: Vec<&str> = changed.iter().map(|k| k.split('.').next().unwrap_or("")).collect();
    g.sort();
    g.dedup();
    g
}

/// Render the files under `etc` and apply the effects for the `changed` keys (all of them
/// when `changed` is None). Returns what was done; failures of single effects are collected
/// and reported together after everything else was applied.
pub fn apply(
    s: &Settings,
    changed: Option<&[String]>,
    etc: &Path,
    host: &dyn Host,
) -> Result<Vec<String>, String> {
    let all = changed.is_none();
    let g = changed.map(groups).unwrap_or_default();
    let touched = |group: &str| all || g.contains(&group);
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for (name, file) in CONFIG_FILES {
        if !file.settings.iter().any(|grp| touched(grp)) {
            continue;
        }
        let path = etc.join(file.path);
        let text = render_file(name, s);
        let r = path.parent().map_or(Ok(()), fs::create_dir_all).and_then(|_| fs::write(&path, text));
        match r {
            Ok(()) => done.push(format!("rendered {}", path.display())),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if touched("network") {
        match host.set_hostname(hostname(s)) {
            Ok(()) => done.push(format!("hostname {}", hostname(s))),
            Err(e) => errors.push(format!("hostname {}: {e}", hostname(s))),
        }
    }
    if touched("kernel") {
        if let Some(l) = s.kernel.as_ref().and_then(|k| k.lockdown) {
            match host.set_lockdown(l.as_str()) {
                Ok(()) => done.push(format!("lockdown {}", l.as_str())),
                Err(e) => errors.push(format!("lockdown {}: {e}", l.as_str())),
            }
        }
        for (k, v) in sysctls(s) {
            match host.write_sysctl(&k, &v) {
                Ok(()) => done.push(format!("sysctl {k}={v}")),
                Err(e) => errors.push(format!("sysctl {k}: {e}")),
            }
        }
    }
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::model::parse;
    use serde_json::json;

    #[test]
    fn renders_and_applies_only_what_changed() {
        let d = std::env::temp_dir().join(format!("berth-render-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let host = RecordingHost { dir: d.join("host") };
        let s = parse(&json!({"motd": "hello", "network": {"hostname": "n1"}, "kernel": {"sysctl": {"vm.swappiness": "7"}}})).unwrap();
        let done = apply(&s, Some(&["motd".to_string()]), &d.join("etc"), &host).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(fs::read_to_string(d.join("etc/motd")).unwrap(), "hello\n");
        assert!(!d.join("host/hostname").exists());
        apply(&s, None, &d.join("etc"), &host).unwrap();
        assert_eq!(fs::read_to_string(d.join("host/hostname")).unwrap(), "n1\n");
        assert_eq!(fs::read_to_string(d.join("host/sysctl/vm.swappiness")).unwrap(), "7\n");
        assert!(fs::read_to_string(d.join("etc/hosts")).unwrap().contains("127.0.1.1 n1"));
        assert_eq!(fs::read_to_string(d.join("etc/sysctl.d/90-berth.conf")).unwrap(), "vm.swappiness = 7\n");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn containerd_config_is_valid_toml_with_mirrors() {
        let s = parse(&json!({"container-registry": {"mirrors": [
            {"registry": "docker.io", "endpoint": ["http://10.0.2.2:5000", "https://m.example"]}]}}))
        .unwrap();
        let text = render_file("containerd", &s);
        let v: toml::Value = toml::from_str(&text).expect("valid TOML");
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(v["version"].as_integer(), Some(2));
        assert_eq!(
            cri["registry"]["mirrors"]["docker.io"]["endpoint"][0].as_str(),
            Some("http://10.0.2.2:5000")
        );
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["BinaryName"].as_str(),
            Some("/usr/sbin/runc")
        );
        assert_eq!(cri["sandbox_image"].as_str(), Some(SANDBOX_IMAGE));
        assert_eq!(cri["enable_selinux"].as_bool(), Some(true));
        let s =
            parse(&json!({"kubernetes": {"pod-infra-container-image": "10.0.2.2:5000/t/pause:1"}})).unwrap();
        let v: toml::Value = toml::from_str(&render_file("containerd", &s)).expect("valid TOML");
        assert_eq!(
            v["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("10.0.2.2:5000/t/pause:1")
        );
    }

    #[test]
    fn sysctl_paths() {
        assert_eq!(sysctl_path("net.ipv4.ip_forward"), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.1/rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.1/rp_filter")
        );
    }

    struct Failing;
    impl Host for Failing {
        fn set_hostname(&self, _: &str) -> io::Result<()> {
            Err(io::Error::other("nope"))
        }
        fn write_sysctl(&self, _: &str, _: &str) -> io::Result<()> {
            Err(io::Error::other("read-only"))
        }
        fn hostname(&self) -> io::Result<String> {
            Err(io::Error::other("nope"))
        }
        fn read_sysctl(&self, _: &str) -> io::Result<String> {
            Err(io::Error::other("nope"))
        }
        fn set_lockdown(&self, _: &str) -> io::Result<()> {
            Err(io::Error::other("nope"))
        }
    }

    #[test]
    fn failures_are_collected_not_fatal() {
        let d = std::env::temp_dir().join(format!("berth-render-f-{}", std::process::id()));
        let s = parse(&json!({"motd": "m", "kernel": {"sysctl": {"vm.a": "1"}}})).unwrap();
        let e = apply(&s, None, &d, &Failing).unwrap_err();
        assert!(e.contains("hostname berth: nope") && e.contains("sysctl vm.a: read-only"), "{e}");
        assert_eq!(fs::read_to_string(d.join("motd")).unwrap(), "m\n", "files still rendered");
        fs::remove_dir_all(&d).unwrap();
    }
}
