//! Turning settings into effects: configuration files rendered under /etc (a tmpfs, rendered
//! anew on every boot), the hostname, and sysctls written to /proc/sys.
//!
//! The files, as Bottlerocket's settings mean them (docs/settings.md): containerd's config
//! (CRI options, `sandbox_image`, registry mirrors and credentials) and its base OCI spec
//! for `settings.oci-defaults` ([`cri_base_spec`]), kubelet's configuration
//! ([`kubelet`]), resolv.conf (the network's with `settings.dns` on top, [`resolv_conf`]), the
//! proxy environment ([`proxy_env`], also given to the services through their specs), the AWS
//! files, the trust bundle. Files holding secrets are written mode 0600.
//!
//! The effects on the running kernel go through [`Host`], so dev mode (`berth serve`) can
//! render the same files into its state directory while never changing the machine it runs on.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::kubelet;
use super::model::{Dns, Settings};
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
        ConfigFile {
            path: "containerd/config.toml",
            settings: &["container-registry", "container-runtime", "oci-defaults", "kubernetes"],
        },
    ),
    ("cri-base", ConfigFile { path: CRI_BASE, settings: &["oci-defaults"] }),
    ("proxy-env", ConfigFile { path: "network/proxy.env", settings: &["network", "kubernetes"] }),
    ("resolv-conf", ConfigFile { path: "resolv.conf", settings: &["dns"] }),
    ("aws-config", ConfigFile { path: AWS_CONFIG, settings: &["aws"] }),
    ("aws-credentials", ConfigFile { path: AWS_CREDENTIALS, settings: &["aws"] }),
    (
        "kubelet-credential-providers",
        ConfigFile { path: kubelet::CREDENTIAL_PROVIDER_CONFIG, settings: &["kubernetes"] },
    ),
    ("kubelet-config", ConfigFile { path: kubelet::CONFIG, settings: &["kubernetes"] }),
    ("kubelet-ca", ConfigFile { path: kubelet::CA, settings: &["kubernetes"] }),
    ("kubelet-bootstrap", ConfigFile { path: kubelet::BOOTSTRAP, settings: &["kubernetes"] }),
    ("ca-bundle", ConfigFile { path: tls::TRUST_BUNDLE_IN_ETC, settings: &["pki"] }),
];

/// The sandbox (pause) image kubelet's pods use; containerd pulls it on first use.
/// `settings.kubernetes.pod-infra-container-image` replaces it.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.9";

/// containerd's base OCI spec for CRI containers (`settings.oci-defaults`), under /etc.
pub const CRI_BASE: &str = "containerd/cri-base.json";
/// The AWS config and credentials files (`settings.aws.config`, `.credentials`), under /etc;
/// given to kubelet (its credential providers) and host containers as `AWS_CONFIG_FILE` and
/// `AWS_SHARED_CREDENTIALS_FILE`.
pub const AWS_CONFIG: &str = "aws/config";
pub const AWS_CREDENTIALS: &str = "aws/credentials";
/// Rendered files that hold secrets: mode 0600.
const SECRET_FILES: &[&str] = &["aws-credentials", "containerd", "kubelet-bootstrap"];

/// The keys of containerd's CRI plugin table from settings (`sandbox_image`,
/// `settings.container-runtime.*`). Like Bottlerocket, a container-runtime key that is 0 or
/// false is left out (containerd's default).
fn cri_keys(s: &Settings) -> String {
    let image =
        s.kubernetes.as_ref().and_then(|k| k.pod_infra_container_image.as_deref()).unwrap_or(SANDBOX_IMAGE);
    let mut out = format!("sandbox_image = {image:?}\n");
    let r = s.container_runtime.clone().unwrap_or_default();
    if let Some(n) = r.max_concurrent_downloads.filter(|&n| n != 0) {
        out.push_str(&format!("max_concurrent_downloads = {n}\n"));
    }
    if let Some(n) = r.max_container_log_line_size.filter(|&n| n != 0) {
        out.push_str(&format!("max_container_log_line_size = {n}\n"));
    }
    if r.enable_unprivileged_ports == Some(true) {
        out.push_str("enable_unprivileged_ports = true\n");
    }
    if r.enable_unprivileged_icmp == Some(true) {
        out.push_str("enable_unprivileged_icmp = true\n");
    }
    out
}

/// `settings.container-registry`: mirrors and credentials as CRI registry tables.
fn registry_tables(s: &Settings) -> String {
    let mut out = String::new();
    let Some(c) = &s.container_registry else { return out };
    for m in c.mirror_list() {
        let endpoints: Vec<String> = m.endpoint.iter().map(|e| toml_str(e)).collect();
        out.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{}]\nendpoint = [{}]\n",
            toml_str(&m.registry),
            endpoints.join(", ")
        ));
    }
    for cr in c.credentials.iter().flatten() {
        // Docker Hub's images are fetched from registry-1.docker.io, whose name containerd
        // looks the login up by (as Bottlerocket does).
        let host = if cr.registry == "docker.io" { "registry-1.docker.io" } else { &cr.registry };
        out.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.auth]\n",
            toml_str(host)
        ));
        for (k, v) in [
            ("username", &cr.username),
            ("password", &cr.password),
            ("auth", &cr.auth),
            ("identitytoken", &cr.identitytoken),
        ] {
            if let Some(v) = v {
                out.push_str(&format!("{k} = {}\n", toml_str(v)));
            }
        }
    }
    out
}

/// `v` as a TOML string (quoted and escaped).
fn toml_str(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

/// The capabilities every CRI container gets by default: containerd's and Bottlerocket's.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "audit-write",
    "chown",
    "dac-override",
    "fowner",
    "fsetid",
    "kill",
    "mknod",
    "net-bind-service",
    "net-raw",
    "setfcap",
    "setgid",
    "setpcap",
    "setuid",
    "sys-chroot",
];

/// The base OCI spec containerd's CRI plugin starts every container from
/// (`base_runtime_spec`), with `settings.oci-defaults`: containerd's own default spec for
/// Linux, whose capabilities are the defaults above changed by
/// `settings.oci-defaults.capabilities`, and whose rlimits are Bottlerocket's default
/// (`max-open-files` 65536/1048576) changed by `settings.oci-defaults.resource-limits`. CRI
/// then adds what each pod asks for on top (its capabilities, mounts, namespaces).
pub fn cri_base_spec(s: &Settings) -> Value {
    use super::model::{rlimit_value, CAPABILITIES, RESOURCE_LIMITS};
    let o = s.oci_defaults.clone().unwrap_or_default();
    let given = o.capabilities.unwrap_or_default();
    let caps: Vec<String> = CAPABILITIES
        .iter()
        .filter(|c| given.get(**c).copied().unwrap_or(DEFAULT_CAPABILITIES.contains(c)))
        .map(|c| format!("CAP_{}", c.to_uppercase().replace('-', "_")))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut limits: BTreeMap<&str, (u64, u64)> = BTreeMap::from([("RLIMIT_NOFILE", (1_048_576, 65_536))]);
    for (name, l) in o.resource_limits.iter().flatten() {
        let Some((_, kernel)) = RESOURCE_LIMITS.iter().find(|(n, _)| n == name) else { continue };
        if let (Some(h), Some(soft)) = (rlimit_value(&l.hard_limit), rlimit_value(&l.soft_limit)) {
            limits.insert(kernel, (h, soft));
        }
    }
    let rlimits: Vec<Value> =
        limits.iter().map(|(t, (hard, soft))| json!({"type": t, "hard": hard, "soft": soft})).collect();
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": rlimits,
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "cgroupsPath": "/default",
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/sys/devices/virtual/powercap", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// The proxy environment (`settings.network.https-proxy`, `no-proxy`) of containerd, kubelet
/// and host containers (whose image pulls `ctr` makes): `HTTPS_PROXY` and `NO_PROXY`, each
/// also in lowercase. `NO_PROXY` is the given hosts plus, as on Bottlerocket, localhost, the
/// Kubernetes API server's host and `.` + the cluster domain. Empty without a proxy.
pub fn proxy_env(s: &Settings) -> Vec<(String, String)> {
    let Some(n) = &s.network else { return Vec::new() };
    let Some(proxy) = &n.https_proxy else { return Vec::new() };
    let mut no_proxy: Vec<String> = n.no_proxy.clone().unwrap_or_default();
    no_proxy.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    if let Some(k) = &s.kubernetes {
        let host = k.api_server.as_deref().and_then(|u| u.split_once("://")).map(|(_, rest)| {
            let authority = rest.split('/').next().unwrap_or(rest);
            match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_string(),
            }
        });
        no_proxy.extend(host);
        no_proxy.push(format!(".{}", k.cluster_domain.as_deref().unwrap_or("cluster.local")));
    }
    let no_proxy = no_proxy.join(",");
    vec![
        ("HTTPS_PROXY".into(), proxy.clone()),
        ("https_proxy".into(), proxy.clone()),
        ("NO_PROXY".into(), no_proxy.clone()),
        ("no_proxy".into(), no_proxy),
    ]
}

/// The environment that points AWS SDKs at `settings.aws` (kubelet's credential providers,
/// host containers): only for what is set.
pub fn aws_env(s: &Settings) -> Vec<(String, String)> {
    let Some(a) = &s.aws else { return Vec::new() };
    let mut env = Vec::new();
    if a.config.is_some() {
        env.push(("AWS_CONFIG_FILE".into(), format!("/etc/{AWS_CONFIG}")));
    }
    if a.credentials.is_some() {
        env.push(("AWS_SHARED_CREDENTIALS_FILE".into(), format!("/etc/{AWS_CREDENTIALS}")));
    }
    if a.config.is_some() || a.credentials.is_some() || a.profile.is_some() {
        env.push(("AWS_PROFILE".into(), a.profile.clone().unwrap_or_else(|| "default".into())));
    }
    if let Some(r) = &a.region {
        env.push(("AWS_REGION".into(), r.clone()));
    }
    env
}

/// What the network task wrote from DHCP or the static settings (its resolv.conf before
/// `settings.dns`); the rendered /etc/resolv.conf is this with `settings.dns` on top.
pub const NETWORK_RESOLV_CONF: &str = "/run/berth/resolv.conf.network";

/// `settings.dns` as last applied, for the network task's rewrites on lease renewal.
static APPLIED_DNS: std::sync::Mutex<Option<Dns>> = std::sync::Mutex::new(None);

/// resolv.conf: `base` (the network's) with `settings.dns` on top: its name servers replace
/// the network's `nameserver` lines, its search list the `search` line; each falls back to
/// the network's when unset (as on Bottlerocket).
pub fn resolv_conf(base: &str, dns: Option<&Dns>) -> String {
    let servers = dns.and_then(|d| d.name_servers.as_ref()).filter(|l| !l.is_empty());
    let search = dns.and_then(|d| d.search_list.as_ref()).filter(|l| !l.is_empty());
    let mut out = String::new();
    if dns.is_some() {
        out.push_str("# settings.dns applied by berth over the network's own servers\n");
    }
    if let Some(search) = search {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for line in base.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        let replaced = (word == "nameserver" && servers.is_some()) || (word == "search" && search.is_some());
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    for ns in servers.into_iter().flatten() {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    out
}

/// The resolv.conf for the network task's `base`, with the `settings.dns` last applied.
pub fn resolv_conf_for_network(base: &str) -> String {
    let dns = APPLIED_DNS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    resolv_conf(base, dns.as_ref())
}

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
    out.push_str(&cri_keys(s));
    // Pods get container_t with two random categories (from /etc/selinux's lxc_contexts).
    out.push_str("enable_selinux = true\n\n");
    out.push_str(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         default_runtime_name = \"runc\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         runtime_type = \"io.containerd.runc.v2\"\n",
    );
    if s.oci_defaults.is_some() {
        out.push_str(&format!("base_runtime_spec = \"/etc/{CRI_BASE}\"\n"));
    }
    out.push_str(
        "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         BinaryName = \"/usr/sbin/runc\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         bin_dir = \"/usr/libexec/cni\"\n\
         conf_dir = \"/etc/cni/net.d\"\n",
    );
    out.push_str(&registry_tables(s));
    out
}

/// containerd plugins Berth never uses, left unloaded: each costs start time (containerd loads
/// its plugins one after another before it serves) and some memory. What stays: the metadata,
/// content, image, container, task and lease services `ctr` and CRI use, the overlayfs
/// snapshotter, the walking differ, runtime v2 with runc, GC, events, introspection and CRI.
/// Off: the other snapshotters (Berth's DATA is ext4: overlayfs is the only one used; aufs's
/// also runs modprobe), tracing export, the restart monitor (Berth supervises its own
/// services), `opt` (installs into /opt, read-only here). The legacy v1 runtime stays: in 1.6
/// the tasks service will not load without it (and CRI not without the tasks service).
/// Names that a containerd version does not have are ignored by it. See docs/performance.md.
pub const CONTAINERD_DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.native",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.opt",
];

/// The top of containerd's configuration: the plugins it does not load (a root-table key, so
/// it comes before every table of [`containerd_config`]).
fn containerd_plugins() -> String {
    let names: Vec<String> = CONTAINERD_DISABLED_PLUGINS.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "# Plugins Berth does not use (src/settings/render.rs).\ndisabled_plugins = [{}]\n",
        names.join(", ")
    )
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
            let mut out = format!("127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {h}\n");
            for (ip, names) in s.network.as_ref().and_then(|n| n.hosts.as_ref()).into_iter().flatten() {
                out.push_str(&format!("{ip} {}\n", names.join(" ")));
            }
            out
        }
        "sysctl" => sysctls(s).iter().map(|(k, v)| format!("{k} = {v}\n")).collect(),
        "containerd" => containerd_plugins() + &containerd_config(s),
        "cri-base" => {
            if s.oci_defaults.is_some() {
                serde_json::to_string_pretty(&cri_base_spec(s)).expect("JSON serializes") + "\n"
            } else {
                String::new()
            }
        }
        "proxy-env" => proxy_env(s).iter().map(|(k, v)| format!("{k}={v}\n")).collect(),
        "resolv-conf" => {
            *APPLIED_DNS.lock().unwrap_or_else(|p| p.into_inner()) = s.dns.clone();
            resolv_conf(&fs::read_to_string(NETWORK_RESOLV_CONF).unwrap_or_default(), s.dns.as_ref())
        }
        "aws-config" => aws_file(s.aws.as_ref().and_then(|a| a.config.as_deref())),
        "aws-credentials" => aws_file(s.aws.as_ref().and_then(|a| a.credentials.as_deref())),
        "kubelet-credential-providers" => {
            kubelet::configured(s).map(kubelet::credential_provider_config).unwrap_or_default()
        }
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
            // The options Berth's client honours (crate::time::check_options); iburst by default.
            let options =
                s.ntp.as_ref().and_then(|n| n.options.clone()).unwrap_or_else(|| vec!["iburst".into()]);
            let options: String =
                options.iter().flat_map(|o| o.split_whitespace()).map(|o| format!(" {o}")).collect();
            servers.iter().map(|t| format!("server {t}{options}\n")).collect()
        }
        _ => String::new(),
    }
}

fn aws_file(b64: Option<&str>) -> String {
    b64.and_then(kubelet::base64_decode).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
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
        let mode = if SECRET_FILES.contains(name) { 0o600 } else { 0o644 };
        if crate::settings::store::holds(&path, text.as_bytes(), mode) {
            // Boot renders containerd's files before containerd starts and everything after it:
            // the second pass leaves a file that already says this alone.
            continue;
        }
        let r = path.parent().map_or(Ok(()), fs::create_dir_all).map_err(|e| e.to_string()).and_then(|_| {
            crate::settings::store::write_atomic_mode(&path, text.as_bytes(), mode).map_err(|e| e.to_string())
        });
        match r {
            Ok(()) => done.push(format!("rendered {}", path.display())),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if touched("kubernetes") {
        match super::static_pods::sync(s, &etc.join(super::static_pods::DIR)) {
            Ok(d) => done.extend(d),
            Err(e) => errors.push(format!("static pods: {e}")),
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
    if touched("boot") {
        // The next boot's command line (boot control; nothing where it has no firmware to tell).
        match crate::bootctl::set_boot_settings(&s.boot.clone().unwrap_or_default()) {
            Ok(Some(true)) => done.push("next boot's command line written".into()),
            Ok(_) => {}
            Err(e) => errors.push(format!("next boot's command line: {e}")),
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
        // A file that already says what it would be told is left alone (same inode); one that
        // differs, in text or in mode, is replaced.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let ino = |p: &str| fs::metadata(d.join(p)).unwrap().ino();
        let (motd, hosts) = (ino("etc/motd"), ino("etc/hosts"));
        let done = apply(&s, None, &d.join("etc"), &host).unwrap();
        assert!(!done.iter().any(|x| x.starts_with("rendered")), "{done:?}");
        assert_eq!((ino("etc/motd"), ino("etc/hosts")), (motd, hosts));
        fs::set_permissions(d.join("etc/motd"), fs::Permissions::from_mode(0o600)).unwrap();
        let s2 = parse(&json!({"motd": "hello", "network": {"hostname": "n2"}})).unwrap();
        let done = apply(&s2, None, &d.join("etc"), &host).unwrap();
        assert!(done.contains(&format!("rendered {}", d.join("etc/hosts").display())), "{done:?}");
        assert!(done.contains(&format!("rendered {}", d.join("etc/motd").display())), "{done:?}");
        assert_ne!((ino("etc/motd"), ino("etc/hosts")), (motd, hosts));
        assert_eq!(fs::metadata(d.join("etc/motd")).unwrap().permissions().mode() & 0o777, 0o644);
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

    /// The files rendered for a realistic EKS node's user data (tests/data/settings/eks-node.toml)
    /// are exactly the fixtures under tests/data/settings/rendered/. BERTH_UPDATE_FIXTURES=1
    /// rewrites them (to be read and committed deliberately).
    #[test]
    fn ntp_options_go_on_each_server_line_and_the_client_reads_the_names() {
        let s = parse(
            &json!({"ntp": {"time-servers": ["a.example", "10.0.0.1:123"], "options": ["prefer", "iburst"]}}),
        )
        .unwrap();
        let conf = render_file("ntp", &s);
        assert_eq!(conf, "server a.example prefer iburst\nserver 10.0.0.1:123 prefer iburst\n");
        assert_eq!(crate::time::servers_from_conf(&conf), ["a.example", "10.0.0.1:123"]);
        let s = parse(&json!({"ntp": {"time-servers": ["a.example"]}})).unwrap();
        assert_eq!(render_file("ntp", &s), "server a.example iburst\n", "iburst by default, as before");
    }

    #[test]
    fn eks_node_user_data_renders_the_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/settings");
        let bytes = fs::read(dir.join("eks-node.toml")).unwrap();
        let v = crate::userdata::decode(&bytes).unwrap();
        let s = crate::settings::model::parse_for(&v, Some("aws")).unwrap();
        let net = "# Written by berth from the DHCP lease of eth0 (server 10.0.2.2)\nsearch lan\nnameserver 10.0.2.3\n";
        let files = [
            ("kubelet-config", kubelet::config(s.kubernetes.as_ref().unwrap()).to_string()),
            ("kubelet-argv", kubelet::argv(s.kubernetes.as_ref().unwrap()).join("\n") + "\n"),
            ("kubelet-credential-providers", render_file("kubelet-credential-providers", &s)),
            ("containerd", render_file("containerd", &s)),
            ("cri-base", render_file("cri-base", &s)),
            ("proxy-env", render_file("proxy-env", &s)),
            ("resolv-conf", resolv_conf(net, s.dns.as_ref())),
            ("aws-config", render_file("aws-config", &s)),
            ("hosts", render_file("hosts", &s)),
        ];
        let update = std::env::var_os("BERTH_UPDATE_FIXTURES").is_some();
        for (name, text) in files {
            let path = dir.join("rendered").join(name);
            if update {
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(&path, &text).unwrap();
            }
            let want = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(text, want, "{name} differs from {}", path.display());
        }
        // And what each means to its reader.
        let k = kubelet::config(s.kubernetes.as_ref().unwrap());
        assert_eq!(k["evictionHard"]["memory.available"], "200Mi");
        assert_eq!(k["kubeReserved"]["memory"], "893Mi");
        assert_eq!(k["kubeAPIQPS"], 30);
        assert_eq!(k["imageGCHighThresholdPercent"], 85);
        assert_eq!(k["reservedSystemCPUs"], "0");
        assert_eq!(k["memoryManagerPolicy"], "Static");
        assert_eq!(k["reservedMemory"], json!([{"numaNode": 0, "limits": {"memory": "1349Mi"}}]));
        assert_eq!(k["cpuManagerPolicyOptions"], json!({"full-pcpus-only": "true"}));
        assert_eq!(k["memorySwap"], json!({"swapBehavior": "NoSwap"}));
        assert_eq!((&k["imageMaximumGCAge"], &k["imageMinimumGCAge"]), (&json!("168h"), &json!("2m")));
        let c: toml::Value = toml::from_str(&render_file("containerd", &s)).expect("valid TOML");
        let cri = &c["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["max_concurrent_downloads"].as_integer(), Some(4));
        assert_eq!(cri["enable_unprivileged_icmp"].as_bool(), Some(true));
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5")
        );
        assert_eq!(
            cri["registry"]["mirrors"]["ghcr.io"]["endpoint"][0].as_str(),
            Some("https://ghcr-mirror.example.com")
        );
        assert_eq!(
            cri["registry"]["configs"]["registry-1.docker.io"]["auth"]["password"].as_str(),
            Some("s3cret")
        );
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["base_runtime_spec"].as_str(),
            Some("/etc/containerd/cri-base.json")
        );
        let spec = cri_base_spec(&s);
        let caps = spec["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_NET_ADMIN")) && !caps.contains(&json!("CAP_MKNOD")), "{caps:?}");
        assert_eq!(caps.len(), 14, "{caps:?}");
        assert!(spec["process"]["rlimits"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "RLIMIT_CORE", "hard": u64::MAX, "soft": u64::MAX})));
    }

    #[test]
    fn resolv_conf_takes_dns_settings_over_the_network() {
        let base = "# from DHCP\nsearch lan\nnameserver 10.0.2.3\nnameserver 10.0.2.4\n";
        assert_eq!(resolv_conf(base, None), base);
        let only_servers =
            crate::settings::model::Dns { name_servers: Some(vec!["1.1.1.1".into()]), search_list: None };
        assert_eq!(
            resolv_conf(base, Some(&only_servers)),
            "# settings.dns applied by berth over the network's own servers\n# from DHCP\nsearch lan\nnameserver 1.1.1.1\n"
        );
        let only_search = crate::settings::model::Dns {
            name_servers: None,
            search_list: Some(vec!["a.example".into(), "b".into()]),
        };
        assert_eq!(
            resolv_conf(base, Some(&only_search)),
            "# settings.dns applied by berth over the network's own servers\nsearch a.example b\n# from DHCP\nnameserver 10.0.2.3\nnameserver 10.0.2.4\n"
        );
    }

    #[test]
    fn proxy_env_names_the_cluster_hosts() {
        let s = parse(&json!({"network": {"https-proxy": "http://p:3128", "no-proxy": ["10.0.0.0/8"]},
            "kubernetes": {"api-server": "https://api.example:6443/x", "cluster-domain": "c.example"}}))
        .unwrap();
        let env = proxy_env(&s);
        assert_eq!(env[0], ("HTTPS_PROXY".to_string(), "http://p:3128".to_string()));
        assert_eq!(env[2].1, "10.0.0.0/8,localhost,127.0.0.1,api.example,.c.example");
        assert!(proxy_env(&parse(&json!({"network": {"no-proxy": ["x"]}})).unwrap()).is_empty());
        let v6 = parse(&json!({"network": {"https-proxy": "p:1"}, "kubernetes": {"api-server": "https://[fd00::1]:6443"}})).unwrap();
        assert!(proxy_env(&v6)[2].1.contains(",fd00::1,"), "{:?}", proxy_env(&v6));
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

    #[test]
    fn containerd_leaves_out_only_plugins_berth_does_not_use() {
        let v: toml::Value =
            toml::from_str(&render_file("containerd", &Settings::default())).expect("valid TOML");
        let off: Vec<&str> =
            v["disabled_plugins"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert_eq!(off, CONTAINERD_DISABLED_PLUGINS);
        // What Berth's services, ctr (host containers) and CRI (kubelet) need stays loaded.
        for used in [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.overlayfs",
            "io.containerd.runtime.v2.task",
            "io.containerd.runtime.v1.linux",
            "io.containerd.service.v1.tasks-service",
            "io.containerd.differ.v1.walking",
            "io.containerd.metadata.v1.bolt",
            "io.containerd.gc.v1.scheduler",
        ] {
            assert!(!off.iter().any(|p| p == &used), "{used} is disabled");
        }
        assert_eq!(v["version"].as_integer(), Some(2), "the rest of the file is still there");
    }
}
