//! The typed settings model. Key names follow Bottlerocket's where the meaning is the same
//! (kebab-case; `settings.network.hostname`, `settings.kernel.sysctl`, ...). Unknown keys are
//! rejected, and [`parse`] names the full path of whatever is wrong. Bottlerocket keys that
//! mean nothing on Berth are refused with the reason ([`super::refused`]); `settings.aws` only
//! on the aws variant ([`set_variant`]). Growing the model follows the rule in
//! `super::store` (a key is never removed or narrowed).
//! Every setting is documented in docs/settings.md.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub motd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Kernel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ntp: Option<Ntp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updates: Option<Updates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
    /// `settings.dns`: name servers and search list for /etc/resolv.conf (Bottlerocket's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// `settings.oci-defaults`: the base OCI spec of every container containerd's CRI starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oci_defaults: Option<OciDefaults>,
    /// `settings.container-runtime`: containerd's CRI plugin options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<ContainerRuntime>,
    /// `settings.metrics`: Berth sends no metrics; only `send-metrics = false` is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_containers: Option<BTreeMap<String, HostContainer>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_registry: Option<ContainerRegistry>,
    /// Certificate bundles by name (`settings.pki.NAME`), added to or removed from the trust
    /// bundle (see `http::tls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pki: Option<BTreeMap<String, CertificateBundle>>,
    /// AWS facts (`settings.aws.region`, generated from IMDS on EC2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws: Option<Aws>,
    /// `settings.bootstrap-commands.NAME` (see [`super::bootstrap`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_commands: Option<BTreeMap<String, super::bootstrap::BootstrapCommand>>,
    /// `settings.bootstrap-containers.NAME` (see [`super::bootstrap`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_containers: Option<BTreeMap<String, super::bootstrap::BootstrapContainer>>,
    /// `settings.boot`: the next boot's kernel and init parameters (see [`super::boot`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<super::boot::Boot>,
}

/// `settings.aws`: Bottlerocket's keys, accepted on the `aws` variant only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Aws {
    /// The instance's region (`us-west-2`); on EC2 generated from the identity document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Base64 of an AWS config file, written to `/root/.aws/config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Base64 of an AWS credentials file, written to `/root/.aws/credentials` (mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// The profile of those files to use (`AWS_PROFILE`), default `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// `settings.dns` (Bottlerocket's): they win over DHCP's and `network.name-servers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Dns {
    /// IPv4 or IPv6 addresses, at most [`MAX_NAME_SERVERS`] (what the C libraries read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_servers: Option<Vec<String>>,
    /// Domains for the `search` line, at most [`MAX_SEARCH_DOMAINS`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_list: Option<Vec<String>>,
}

pub const MAX_NAME_SERVERS: usize = 3;
/// glibc reads at most 6 search domains (musl 6 as well).
pub const MAX_SEARCH_DOMAINS: usize = 6;

/// `settings.oci-defaults` (Bottlerocket's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OciDefaults {
    /// Capability (kebab-case, without `CAP_`) → granted; unnamed ones keep their default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeMap<String, bool>>,
    /// Limit name (`max-open-files`, ...) → its soft and hard values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<BTreeMap<String, ResourceLimit>>,
}

/// One rlimit: each value a non-negative integer, `-1` or `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResourceLimit {
    pub hard_limit: Value,
    pub soft_limit: Value,
}

/// The value of an rlimit ([`ResourceLimit`]): `u64::MAX` is unlimited (RLIM_INFINITY).
pub fn rlimit_value(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) if n.as_i64() == Some(-1) => Some(u64::MAX),
        Value::Number(n) => n.as_i64().filter(|&i| i >= 0).map(|i| i as u64),
        Value::String(s) if s == "unlimited" => Some(u64::MAX),
        _ => None,
    }
}

/// Bottlerocket's capability names and what the kernel calls them.
pub const CAPABILITIES: &[&str] = &[
    "audit-control",
    "audit-read",
    "audit-write",
    "block-suspend",
    "bpf",
    "checkpoint-restore",
    "chown",
    "dac-override",
    "dac-read-search",
    "fowner",
    "fsetid",
    "ipc-lock",
    "ipc-owner",
    "kill",
    "lease",
    "linux-immutable",
    "mac-admin",
    "mac-override",
    "mknod",
    "net-admin",
    "net-bind-service",
    "net-broadcast",
    "net-raw",
    "perfmon",
    "setfcap",
    "setgid",
    "setpcap",
    "setuid",
    "sys-admin",
    "sys-boot",
    "sys-chroot",
    "sys-module",
    "sys-nice",
    "sys-pacct",
    "sys-ptrace",
    "sys-rawio",
    "sys-resource",
    "sys-time",
    "sys-tty-config",
    "syslog",
    "wake-alarm",
];

/// Bottlerocket's rlimit names and the kernel's.
pub const RESOURCE_LIMITS: &[(&str, &str)] = &[
    ("max-address-space", "RLIMIT_AS"),
    ("max-core-file-size", "RLIMIT_CORE"),
    ("max-cpu-time", "RLIMIT_CPU"),
    ("max-data-size", "RLIMIT_DATA"),
    ("max-file-locks", "RLIMIT_LOCKS"),
    ("max-file-size", "RLIMIT_FSIZE"),
    ("max-locked-memory", "RLIMIT_MEMLOCK"),
    ("max-msgqueue-size", "RLIMIT_MSGQUEUE"),
    ("max-nice-priority", "RLIMIT_NICE"),
    ("max-open-files", "RLIMIT_NOFILE"),
    ("max-pending-signals", "RLIMIT_SIGPENDING"),
    ("max-processes", "RLIMIT_NPROC"),
    ("max-realtime-priority", "RLIMIT_RTPRIO"),
    ("max-realtime-timeout", "RLIMIT_RTTIME"),
    ("max-resident-set", "RLIMIT_RSS"),
    ("max-stack-size", "RLIMIT_STACK"),
];

/// `settings.container-runtime` (Bottlerocket's): containerd's CRI options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContainerRuntime {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_downloads: Option<i32>,
    /// Bytes; -1 is no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_container_log_line_size: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_unprivileged_ports: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_unprivileged_icmp: Option<bool>,
}

/// `settings.metrics`: Berth sends nothing; see [`Settings::validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_metrics: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Network {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The interface to configure (default: the first Ethernet interface).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// A static IPv4 address with prefix, `10.0.0.5/24`; without it, DHCPv4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_address: Option<String>,
    /// The default gateway with a static address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS servers with a static address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_servers: Option<Vec<String>>,
    /// The HTTPS proxy (`HTTPS_PROXY`) of containerd, kubelet and host container pulls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// Hosts not to reach through the proxy (`NO_PROXY`), added to Berth's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<Vec<String>>,
    /// Static `/etc/hosts` entries, Bottlerocket's shape: `[["10.0.0.1", ["a", "b.example"]]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<(String, Vec<String>)>>,
}

/// Parse `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok().filter(|&l| (1..=32).contains(&l))?;
    Some((a.parse().ok()?, len))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Kernel {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sysctl: Option<BTreeMap<String, String>>,
    /// `settings.kernel.lockdown` (Bottlerocket's key): written to securityfs; the kernel only
    /// ever raises it (none < integrity < confidentiality) until the next boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lockdown: Option<Lockdown>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lockdown {
    None,
    Integrity,
    Confidentiality,
}

impl Lockdown {
    pub fn as_str(self) -> &'static str {
        match self {
            Lockdown::None => "none",
            Lockdown::Integrity => "integrity",
            Lockdown::Confidentiality => "confidentiality",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Ntp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_servers: Option<Vec<String>>,
    /// chrony's options for each server line, Bottlerocket's shape (`["iburst", "prefer"]`);
    /// see [`crate::time::check_options`] for what Berth's client honours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Updates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_base_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets_base_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_waves: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Kubernetes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_labels: Option<BTreeMap<String, String>>,
    /// Taint key → list of `value:Effect`, as Bottlerocket has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_taints: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pods: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_dns_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standalone_mode: Option<bool>,
    // Bottlerocket's kubelet tuning keys (issue 18); each renders one KubeletConfiguration
    // field or kubelet flag (src/settings/kubelet.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_hard: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_soft: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_soft_grace_period: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_max_pod_grace_period: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_reserved: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_reserved: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_api_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_api_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_files: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_cfs_quota_enforced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_reconcile_period: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology_manager_scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology_manager_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_pids_limit: Option<i64>,
    /// A number or a string of one (Bottlerocket takes both and gives back the form given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_gc_high_threshold_percent: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_gc_low_threshold_percent: Option<Value>,
    /// The pause image: containerd's `sandbox_image` on Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_infra_container_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_bootstrap: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period_for_critical_pods: Option<String>,
    /// `tls` only (there is no aws-iam-authenticator on Berth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_providers: Option<BTreeMap<String, CredentialProvider>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp_default: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname_override: Option<String>,
    /// `external` or empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_provider: Option<String>,
    /// kubelet's `-v`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<u8>,
    /// `settings.kubernetes.static-pods.NAME` (see [`super::static_pods`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_pods: Option<BTreeMap<String, super::static_pods::StaticPod>>,
    /// The node's IP address for kubelet (`--node-ip`); on EC2 generated from IMDS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    /// The node's provider ID (`providerID`), `aws:///ZONE/INSTANCE-ID` on EC2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    // Bottlerocket's newer kubelet keys (checked in `validate_newer`, rendered in
    // `kubelet::newer`).
    /// CPUs kept for the system (`reservedSystemCPUs`): a cpuset list, `0-1,4`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_cpus: Option<String>,
    /// `Static` or `None` (also lowercase): `memoryManagerPolicy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_manager_policy: Option<String>,
    /// NUMA node → reservation (`reservedMemory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_manager_reserved_memory: Option<BTreeMap<String, MemoryReservation>>,
    /// `full-pcpus-only`: `cpuManagerPolicyOptions`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_policy_options: Option<Vec<String>>,
    /// `NoSwap` or `LimitedSwap`: `memorySwap.swapBehavior`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_swap_behavior: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_maximum_gc_age: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_minimum_gc_age: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_workers: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_monitor_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_parallel_image_pulls: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_process_oom_kill: Option<bool>,
}

/// `settings.kubernetes.memory-manager-reserved-memory.NODE`: Bottlerocket's shape, `enabled`
/// and the limits by resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemoryReservation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(rename = "hugepages-2Mi", skip_serializing_if = "Option::is_none")]
    pub hugepages_2mi: Option<String>,
    #[serde(rename = "hugepages-1Gi", skip_serializing_if = "Option::is_none")]
    pub hugepages_1gi: Option<String>,
}

impl MemoryReservation {
    /// The limits that are set, by kubelet's resource name.
    pub fn limits(&self) -> Vec<(&'static str, &str)> {
        [
            ("memory", &self.memory),
            ("hugepages-2Mi", &self.hugepages_2mi),
            ("hugepages-1Gi", &self.hugepages_1gi),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.as_deref().map(|v| (n, v)))
        .collect()
    }
}

/// `settings.kubernetes.credential-providers.NAME`: a kubelet image credential provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CredentialProvider {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_patterns: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HostContainer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub superpowered: Option<bool>,
    /// Base64 of data given to the container at
    /// `/.bottlerocket/host-containers/current/user-data` (Bottlerocket's key and place).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// The most base64 text `settings.host-containers.NAME.user-data` may hold.
pub const MAX_HOST_CONTAINER_USER_DATA: usize = 64 * 1024;

/// The longest `settings.kubernetes.provider-id`.
pub const MAX_PROVIDER_ID: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContainerRegistry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Mirrors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Vec<RegistryCredential>>,
}

/// `settings.container-registry.mirrors` in either of Bottlerocket's forms, kept as given:
/// a list of `{registry, endpoint}` tables, or a table `registry = [endpoints]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Mirrors {
    List(Vec<Mirror>),
    Table(BTreeMap<String, Vec<String>>),
}

impl Mirrors {
    /// The mirrors as a list, whichever form they were given in.
    pub fn list(&self) -> Vec<Mirror> {
        match self {
            Mirrors::List(l) => l.clone(),
            Mirrors::Table(t) => {
                t.iter().map(|(r, e)| Mirror { registry: r.clone(), endpoint: e.clone() }).collect()
            }
        }
    }
}

impl ContainerRegistry {
    pub fn mirror_list(&self) -> Vec<Mirror> {
        self.mirrors.as_ref().map(Mirrors::list).unwrap_or_default()
    }
}

/// `settings.container-registry.credentials[]`: a registry's login for containerd's pulls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryCredential {
    pub registry: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Base64 of `username:password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identitytoken: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Mirror {
    pub registry: String,
    pub endpoint: Vec<String>,
}

/// `settings.pki.NAME`: Bottlerocket's keys and meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CertificateBundle {
    /// Base64 of PEM text holding one or more certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Trust the certificates (true), or distrust them even if the image's bundle has them
    /// (false, the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted: Option<bool>,
}

/// The most base64 text one `settings.pki.NAME.data` may hold (a whole public CA bundle fits).
pub const MAX_PKI_DATA: usize = 512 * 1024;

/// A setting that is not acceptable, with its full dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for Invalid {}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { key: key.into(), message: message.into() }
}

/// The variant this program runs as (the slot's `variant`), set once by PID 1 before the
/// datastore is opened. Unset (dev mode, host tools, unit tests) means any variant: keys of
/// every variant are accepted.
static VARIANT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn set_variant(variant: &str) {
    let _ = VARIANT.set(variant.to_string());
}

/// Whether this variant takes `settings.aws` (the aws variant; any when unset).
pub fn aws_settings_allowed() -> bool {
    VARIANT.get().is_none_or(|v| v == "aws")
}

/// Deserialize and validate settings from JSON, naming the failing key (`settings.x.y`).
pub fn parse(value: &Value) -> Result<Settings, Invalid> {
    parse_for(value, VARIANT.get().map(String::as_str))
}

/// [`parse`] for `variant` (None: any).
pub fn parse_for(value: &Value, variant: Option<&str>) -> Result<Settings, Invalid> {
    if !value.is_object() {
        return Err(invalid("settings", "wrong shape: expected an object of settings"));
    }
    if let Some((key, why)) = super::refused::check(value, variant) {
        return Err(invalid(key, why));
    }
    let settings: Settings = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "settings".to_string() } else { format!("settings.{path}") };
        invalid(key, e.into_inner().to_string())
    })?;
    // serde accepts a JSON array for a struct (fields in order); we do not. The typed value
    // must give back exactly what was sent, or some part had the wrong shape.
    let back = serde_json::to_value(&settings).expect("settings serialize");
    if let Some(key) = first_difference("settings", value, &back) {
        return Err(invalid(key, "wrong shape: expected an object here"));
    }
    settings.validate()?;
    Ok(settings)
}

fn first_difference(path: &str, sent: &Value, typed: &Value) -> Option<String> {
    match (sent, typed) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| first_difference(&format!("{path}.{k}"), v, b.get(k).unwrap_or(&Value::Null))),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(&format!("{path}[{i}]"), x, y)),
        (a, b) if a == b => None,
        _ => Some(path.to_string()),
    }
}

/// An RFC 1123 host name: dot-separated labels of letters, digits and '-', 1–63 each.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A sysctl name as written with dots: `net.ipv4.ip_forward`, `kernel.pid_max`.
pub fn valid_sysctl_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 256
        && k.split(['.', '/']).all(|seg| {
            !seg.is_empty()
                && seg != ".."
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || "_-:".contains(c))
        })
}

fn check_url(key: &str, url: &Option<String>) -> Result<(), Invalid> {
    match url {
        Some(u)
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.contains(char::is_whitespace) =>
        {
            Err(invalid(key, format!("'{u}' is not an http:// or https:// URL")))
        }
        _ => Ok(()),
    }
}

/// One line of at most `max` bytes (Bottlerocket's SingleLineString, bounded).
fn single_line(s: &str, max: usize) -> bool {
    s.len() <= max && !s.contains(['\n', '\r', '\u{b}', '\u{c}', '\u{85}', '\u{2028}', '\u{2029}', '\0'])
}

/// A decimal number: digits with an optional fraction.
fn decimal(s: &str) -> bool {
    let (i, f) = s.split_once('.').unwrap_or((s, "0"));
    !i.is_empty()
        && !f.is_empty()
        && i.bytes().all(|c| c.is_ascii_digit())
        && f.bytes().all(|c| c.is_ascii_digit())
}

/// A Kubernetes quantity as Bottlerocket accepts it: `128974848`, `129e6`, `129M`, `123Mi`,
/// `100m`.
pub fn valid_quantity(q: &str) -> bool {
    const SUFFIXES: &[&str] =
        &["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "K", "M", "G", "T", "P", "E"];
    if q.is_empty() || q.len() > 64 {
        return false;
    }
    if let Some((m, e)) = q.split_once('e') {
        return decimal(m) && !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit());
    }
    let num = SUFFIXES.iter().find_map(|s| q.strip_suffix(s)).unwrap_or(q);
    decimal(num)
}

/// An eviction threshold: a quantity, or a percentage below 100 (`10%`, `7.5%`).
pub fn valid_threshold(t: &str) -> bool {
    match t.strip_suffix('%') {
        Some(p) => decimal(p) && p.parse::<f64>().is_ok_and(|p| p < 100.0),
        None => valid_quantity(t),
    }
}

/// A duration as Bottlerocket accepts it: parts `<n>h`, `<n>m`, `<n>s`, `<n>ms`, each at most
/// once and in that order (`1h30m`, `90s`, `0.5s`).
pub fn valid_duration(d: &str) -> bool {
    const UNITS: &[&str] = &["h", "m", "s", "ms"];
    if d.is_empty() || d.len() > 32 {
        return false;
    }
    let mut rest = d;
    let mut next = 0;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if !decimal(&rest[..n]) {
            return false;
        }
        rest = &rest[n..];
        let unit = if rest.starts_with("ms") { "ms" } else { &rest[..rest.len().min(1)] };
        match UNITS.iter().position(|u| *u == unit) {
            Some(i) if i >= next => next = i + 1,
            _ => return false,
        }
        rest = &rest[unit.len()..];
    }
    true
}

/// The signals kubelet's eviction thresholds take.
pub const EVICTION_SIGNALS: &[&str] = &[
    "memory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
    "pid.available",
];

/// The resources kube-reserved and system-reserved take.
pub const RESERVED_RESOURCES: &[&str] = &["cpu", "memory", "ephemeral-storage", "pid"];

/// An image GC threshold: 0–100, as a number or a string of one.
pub fn gc_percent(v: &Value) -> Option<u8> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    u8::try_from(n).ok().filter(|&n| n <= 100)
}

fn check_map(
    key: &str,
    map: &Option<BTreeMap<String, String>>,
    names: &[&str],
    ok: fn(&str) -> bool,
    what: &str,
) -> Result<(), Invalid> {
    for (k, v) in map.iter().flatten() {
        if !names.contains(&k.as_str()) {
            return Err(invalid(format!("{key}.{k}"), format!("not one of {}", names.join(", "))));
        }
        if !ok(v) {
            return Err(invalid(format!("{key}.{k}"), format!("'{v}' is not {what}")));
        }
    }
    Ok(())
}

fn check_one_of(key: &str, v: &Option<String>, allowed: &[&str]) -> Result<(), Invalid> {
    match v {
        Some(v) if !allowed.contains(&v.as_str()) => {
            Err(invalid(key, format!("'{v}' is not one of {}", allowed.join(", "))))
        }
        _ => Ok(()),
    }
}

fn check_non_negative(key: &str, v: Option<i32>) -> Result<(), Invalid> {
    if v.is_some_and(|v| v < 0) {
        return Err(invalid(key, "must not be negative"));
    }
    Ok(())
}

/// An identifier as Bottlerocket has it (credential provider names): `[A-Za-z0-9-]{1,76}`.
fn identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 76 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Kubernetes {
    /// The issue-18 keys (tuning kubelet); the older ones are checked in [`Settings::validate`].
    fn validate_tuning(&self) -> Result<(), Invalid> {
        const K: &str = "settings.kubernetes";
        if let Some(d) = &self.cluster_domain {
            if !valid_hostname(d) || d.parse::<std::net::IpAddr>().is_ok() {
                return Err(invalid(format!("{K}.cluster-domain"), format!("'{d}' is not a DNS domain")));
            }
        }
        check_map(
            &format!("{K}.eviction-hard"),
            &self.eviction_hard,
            EVICTION_SIGNALS,
            valid_threshold,
            "a quantity or a percentage below 100%",
        )?;
        check_map(
            &format!("{K}.eviction-soft"),
            &self.eviction_soft,
            EVICTION_SIGNALS,
            valid_threshold,
            "a quantity or a percentage below 100%",
        )?;
        check_map(
            &format!("{K}.eviction-soft-grace-period"),
            &self.eviction_soft_grace_period,
            EVICTION_SIGNALS,
            valid_duration,
            "a duration (1h2m3s4ms)",
        )?;
        check_map(
            &format!("{K}.kube-reserved"),
            &self.kube_reserved,
            RESERVED_RESOURCES,
            valid_quantity,
            "a quantity",
        )?;
        check_map(
            &format!("{K}.system-reserved"),
            &self.system_reserved,
            RESERVED_RESOURCES,
            valid_quantity,
            "a quantity",
        )?;
        check_non_negative(
            &format!("{K}.eviction-max-pod-grace-period"),
            self.eviction_max_pod_grace_period,
        )?;
        for (name, v) in [
            ("registry-qps", self.registry_qps),
            ("registry-burst", self.registry_burst),
            ("event-qps", self.event_qps),
            ("event-burst", self.event_burst),
            ("kube-api-qps", self.kube_api_qps),
            ("kube-api-burst", self.kube_api_burst),
        ] {
            check_non_negative(&format!("{K}.{name}"), v)?;
        }
        let sysctls = self.allowed_unsafe_sysctls.as_deref().unwrap_or_default();
        if sysctls.len() > 64 {
            return Err(invalid(format!("{K}.allowed-unsafe-sysctls"), "more than 64 entries"));
        }
        if let Some(s) = sysctls.iter().find(|s| {
            let name = s.strip_suffix('*').unwrap_or(s);
            !(name.is_empty() && s.as_str() == "*" || valid_sysctl_key(name.trim_end_matches('.')))
        }) {
            return Err(invalid(
                format!("{K}.allowed-unsafe-sysctls"),
                format!("'{s}' is not a sysctl name or pattern (net.core.*)"),
            ));
        }
        if let Some(q) = &self.container_log_max_size {
            if !valid_quantity(q) {
                return Err(invalid(
                    format!("{K}.container-log-max-size"),
                    format!("'{q}' is not a quantity (10Mi)"),
                ));
            }
        }
        if self.container_log_max_files.is_some_and(|n| n < 2) {
            return Err(invalid(
                format!("{K}.container-log-max-files"),
                "must be at least 2 (kubelet's rule)",
            ));
        }
        check_one_of(
            &format!("{K}.cpu-manager-policy"),
            &self.cpu_manager_policy,
            &["none", "static", "None", "Static"],
        )?;
        check_one_of(
            &format!("{K}.topology-manager-scope"),
            &self.topology_manager_scope,
            &["container", "pod"],
        )?;
        check_one_of(
            &format!("{K}.topology-manager-policy"),
            &self.topology_manager_policy,
            &["none", "restricted", "best-effort", "single-numa-node"],
        )?;
        check_one_of(&format!("{K}.authentication-mode"), &self.authentication_mode, &["tls"])?;
        check_one_of(&format!("{K}.cloud-provider"), &self.cloud_provider, &["external", ""])?;
        for (name, d) in [
            ("cpu-manager-reconcile-period", &self.cpu_manager_reconcile_period),
            ("shutdown-grace-period", &self.shutdown_grace_period),
            ("shutdown-grace-period-for-critical-pods", &self.shutdown_grace_period_for_critical_pods),
        ] {
            if let Some(d) = d {
                if !valid_duration(d) {
                    return Err(invalid(
                        format!("{K}.{name}"),
                        format!("'{d}' is not a duration (1h2m3s4ms)"),
                    ));
                }
            }
        }
        if self.pod_pids_limit.is_some_and(|n| n < -1) {
            return Err(invalid(format!("{K}.pod-pids-limit"), "must be -1 (no limit) or more"));
        }
        let high = self.image_gc_high_threshold_percent.as_ref();
        let low = self.image_gc_low_threshold_percent.as_ref();
        for (name, v) in [("image-gc-high-threshold-percent", high), ("image-gc-low-threshold-percent", low)]
        {
            if v.is_some_and(|v| gc_percent(v).is_none()) {
                return Err(invalid(format!("{K}.{name}"), "must be 0-100 (a number or a string of one)"));
            }
        }
        if let (Some(h), Some(l)) = (high.and_then(gc_percent), low.and_then(gc_percent)) {
            if l > h {
                return Err(invalid(
                    format!("{K}.image-gc-low-threshold-percent"),
                    "must not be above image-gc-high-threshold-percent (kubelet's rule)",
                ));
            }
        }
        if let Some(i) = &self.pod_infra_container_image {
            if i.is_empty() || !single_line(i, 512) || i.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("{K}.pod-infra-container-image"),
                    "not an image reference (one word, at most 512 bytes)",
                ));
            }
        }
        if let Some(h) = &self.hostname_override {
            if !valid_hostname(h) || h.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(invalid(
                    format!("{K}.hostname-override"),
                    format!("'{h}' is not a lowercase host name"),
                ));
            }
        }
        if self.log_level.is_some_and(|l| l > 10) {
            return Err(invalid(format!("{K}.log-level"), "must be 0-10"));
        }
        let providers = self.credential_providers.iter().flatten();
        if self.credential_providers.as_ref().is_some_and(|p| p.len() > 16) {
            return Err(invalid(format!("{K}.credential-providers"), "more than 16 providers"));
        }
        for (name, p) in providers {
            let key = format!("{K}.credential-providers.{name}");
            if !identifier(name) {
                return Err(invalid(key, "name must be 1-76 of [A-Za-z0-9-] (the plugin's file name)"));
            }
            let patterns = p.image_patterns.as_deref().unwrap_or_default();
            if patterns.len() > 64
                || patterns.iter().any(|i| i.is_empty() || !single_line(i, 256) || i.contains(' '))
            {
                return Err(invalid(
                    format!("{key}.image-patterns"),
                    "at most 64 patterns, each one word of at most 256 bytes",
                ));
            }
            if p.enabled == Some(true) && patterns.is_empty() {
                return Err(invalid(
                    format!("{key}.image-patterns"),
                    "an enabled provider needs at least one pattern",
                ));
            }
            if let Some(d) = &p.cache_duration {
                if !valid_duration(d) {
                    return Err(invalid(
                        format!("{key}.cache-duration"),
                        format!("'{d}' is not a duration (1h2m3s4ms)"),
                    ));
                }
            }
            for (k, v) in p.environment.iter().flatten() {
                let ok_name = !k.is_empty()
                    && k.len() <= 128
                    && !k.starts_with(|c: char| c.is_ascii_digit())
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok_name || !single_line(v, 4096) {
                    return Err(invalid(
                        format!("{key}.environment.{k}"),
                        "a variable name of [A-Za-z0-9_] and a value of one line",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The most `settings.network.hosts` entries, and names per entry.
pub const MAX_HOSTS_ENTRIES: usize = 256;
pub const MAX_NAMES_PER_HOST: usize = 16;

/// A cpuset list as the kernel writes it: `0`, `0-3`, `0-1,4,6-7` (ascending, CPUs < 8192).
pub fn valid_cpuset(s: &str) -> bool {
    let mut last: Option<u32> = None;
    !s.is_empty()
        && s.len() <= 256
        && s.split(',').all(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let num = |x: &str| {
                (!x.is_empty() && x.len() <= 4 && x.bytes().all(|c| c.is_ascii_digit()))
                    .then(|| x.parse::<u32>().ok())
                    .flatten()
                    .filter(|&n| n < 8192)
            };
            match (num(a), num(b)) {
                (Some(a), Some(b)) if a <= b && last.is_none_or(|l| a > l) => {
                    last = Some(b);
                    true
                }
                _ => false,
            }
        })
}

impl Kubernetes {
    /// Bottlerocket's newer kubelet keys.
    fn validate_newer(&self) -> Result<(), Invalid> {
        const K: &str = "settings.kubernetes";
        if let Some(c) = &self.reserved_cpus {
            if !valid_cpuset(c) {
                return Err(invalid(
                    format!("{K}.reserved-cpus"),
                    format!("'{c}' is not a CPU list (0-1,4: ascending numbers and ranges)"),
                ));
            }
        }
        check_one_of(
            &format!("{K}.memory-manager-policy"),
            &self.memory_manager_policy,
            &["Static", "None", "static", "none"],
        )?;
        let reserved = self.memory_manager_reserved_memory.iter().flatten();
        if self.memory_manager_reserved_memory.as_ref().is_some_and(|m| m.len() > 64) {
            return Err(invalid(format!("{K}.memory-manager-reserved-memory"), "more than 64 NUMA nodes"));
        }
        for (node, r) in reserved {
            let key = format!("{K}.memory-manager-reserved-memory.{node}");
            if node.is_empty() || node.len() > 4 || !node.bytes().all(|c| c.is_ascii_digit()) {
                return Err(invalid(key, "the name must be a NUMA node number (0, 1, ...)"));
            }
            if r.enabled == Some(true) && r.limits().is_empty() {
                return Err(invalid(
                    key,
                    "an enabled reservation needs memory, hugepages-2Mi or hugepages-1Gi",
                ));
            }
            if let Some((name, q)) = r.limits().into_iter().find(|(_, q)| !valid_quantity(q)) {
                return Err(invalid(format!("{key}.{name}"), format!("'{q}' is not a quantity (1Gi)")));
            }
        }
        let options = self.cpu_manager_policy_options.as_deref().unwrap_or_default();
        if let Some(o) = options.iter().find(|o| o.as_str() != "full-pcpus-only") {
            return Err(invalid(
                format!("{K}.cpu-manager-policy-options"),
                format!("'{o}' is not a CPU manager option Bottlerocket takes (full-pcpus-only)"),
            ));
        }
        if !options.is_empty() && !matches!(self.cpu_manager_policy.as_deref(), Some("static" | "Static")) {
            return Err(invalid(
                format!("{K}.cpu-manager-policy-options"),
                "only with cpu-manager-policy = \"static\" (kubelet's rule)",
            ));
        }
        check_one_of(
            &format!("{K}.memory-swap-behavior"),
            &self.memory_swap_behavior,
            &["NoSwap", "LimitedSwap"],
        )?;
        for (name, d) in [
            ("image-maximum-gc-age", &self.image_maximum_gc_age),
            ("image-minimum-gc-age", &self.image_minimum_gc_age),
            ("container-log-monitor-interval", &self.container_log_monitor_interval),
        ] {
            if let Some(d) = d {
                if !valid_duration(d) {
                    return Err(invalid(
                        format!("{K}.{name}"),
                        format!("'{d}' is not a duration (1h2m3s4ms)"),
                    ));
                }
            }
        }
        for (name, v) in [
            ("container-log-max-workers", self.container_log_max_workers),
            ("max-parallel-image-pulls", self.max_parallel_image_pulls),
        ] {
            if v.is_some_and(|v| v < 1) {
                return Err(invalid(format!("{K}.{name}"), "must be at least 1 (kubelet's rule)"));
            }
        }
        Ok(())
    }
}

impl Settings {
    /// The issue-18 groups: dns, proxy, oci-defaults, container-runtime, registry credentials,
    /// aws files.
    fn validate_more(&self) -> Result<(), Invalid> {
        if let Some(n) = &self.network {
            if let Some(p) = &n.https_proxy {
                // Bottlerocket's Url: a URL, or one once http:// is put in front (host:port).
                let rest = p.strip_prefix("http://").or_else(|| p.strip_prefix("https://")).unwrap_or(p);
                if rest.is_empty()
                    || !single_line(p, 2048)
                    || p.contains(char::is_whitespace)
                    || rest.contains("://")
                {
                    return Err(invalid(
                        "settings.network.https-proxy",
                        format!("'{p}' is not a proxy URL (http://HOST:PORT or HOST:PORT)"),
                    ));
                }
            }
            let np = n.no_proxy.as_deref().unwrap_or_default();
            if np.len() > 256
                || np.iter().any(|h| h.is_empty() || !single_line(h, 253) || h.contains([' ', ',']))
            {
                return Err(invalid(
                    "settings.network.no-proxy",
                    "at most 256 entries, each a host, domain or CIDR without spaces or commas",
                ));
            }
            let hosts = n.hosts.as_deref().unwrap_or_default();
            if hosts.len() > MAX_HOSTS_ENTRIES {
                return Err(invalid(
                    "settings.network.hosts",
                    format!("more than {MAX_HOSTS_ENTRIES} entries"),
                ));
            }
            for (ip, names) in hosts {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(invalid("settings.network.hosts", format!("'{ip}' is not an IP address")));
                }
                if names.is_empty() || names.len() > MAX_NAMES_PER_HOST {
                    return Err(invalid(
                        "settings.network.hosts",
                        format!("{ip}: between 1 and {MAX_NAMES_PER_HOST} names"),
                    ));
                }
                if let Some(bad) = names.iter().find(|h| !valid_hostname(h)) {
                    return Err(invalid(
                        "settings.network.hosts",
                        format!("{ip}: '{bad}' is not a host name"),
                    ));
                }
            }
            // What the updater reads the same way (an https:// proxy is for the services only).
            if let Some(p) = n.https_proxy.as_deref().filter(|p| !p.starts_with("https://")) {
                if let Err(e) = crate::http::proxy::Proxy::new(p, np) {
                    let key = if e.starts_with("no-proxy") {
                        "settings.network.no-proxy"
                    } else {
                        "settings.network.https-proxy"
                    };
                    return Err(invalid(key, e));
                }
            }
        }
        if let Some(d) = &self.dns {
            let ns = d.name_servers.as_deref().unwrap_or_default();
            if ns.len() > MAX_NAME_SERVERS {
                return Err(invalid(
                    "settings.dns.name-servers",
                    format!("more than {MAX_NAME_SERVERS} (the C libraries read no more)"),
                ));
            }
            if let Some(bad) = ns.iter().find(|a| a.parse::<std::net::IpAddr>().is_err()) {
                return Err(invalid("settings.dns.name-servers", format!("'{bad}' is not an IP address")));
            }
            let sl = d.search_list.as_deref().unwrap_or_default();
            if sl.len() > MAX_SEARCH_DOMAINS {
                return Err(invalid(
                    "settings.dns.search-list",
                    format!("more than {MAX_SEARCH_DOMAINS} domains (the C libraries read no more)"),
                ));
            }
            if let Some(bad) =
                sl.iter().find(|h| !valid_hostname(h) || h.chars().any(|c| c.is_ascii_uppercase()))
            {
                return Err(invalid(
                    "settings.dns.search-list",
                    format!("'{bad}' is not a lowercase domain name"),
                ));
            }
        }
        if let Some(o) = &self.oci_defaults {
            for cap in o.capabilities.iter().flatten().map(|(c, _)| c) {
                if !CAPABILITIES.contains(&cap.as_str()) {
                    return Err(invalid(
                        format!("settings.oci-defaults.capabilities.{cap}"),
                        "not a capability (kebab-case, without CAP_: net-admin)",
                    ));
                }
            }
            for (name, l) in o.resource_limits.iter().flatten() {
                let key = format!("settings.oci-defaults.resource-limits.{name}");
                if !RESOURCE_LIMITS.iter().any(|(n, _)| n == name) {
                    return Err(invalid(key, "not a resource limit (max-open-files, max-processes, ...)"));
                }
                let (Some(hard), Some(soft)) = (rlimit_value(&l.hard_limit), rlimit_value(&l.soft_limit))
                else {
                    return Err(invalid(
                        key,
                        "each limit must be a non-negative integer, -1 or \"unlimited\"",
                    ));
                };
                if soft > hard {
                    return Err(invalid(format!("{key}.soft-limit"), "must not be above hard-limit"));
                }
            }
        }
        if let Some(r) = &self.container_runtime {
            check_non_negative(
                "settings.container-runtime.max-concurrent-downloads",
                r.max_concurrent_downloads,
            )?;
            if r.max_container_log_line_size.is_some_and(|n| n < -1) {
                return Err(invalid(
                    "settings.container-runtime.max-container-log-line-size",
                    "must be -1 (no limit) or more",
                ));
            }
        }
        if let Some(c) = &self.container_registry {
            let mirrors = c.mirror_list();
            if mirrors.len() > 64 {
                return Err(invalid("settings.container-registry.mirrors", "more than 64 registries"));
            }
            for m in &mirrors {
                let key = format!("settings.container-registry.mirrors.{}", m.registry);
                if m.registry.is_empty()
                    || !single_line(&m.registry, 253)
                    || m.registry.contains(['"', '\\', ' '])
                {
                    return Err(invalid(key, "not a registry name"));
                }
                if m.endpoint.len() > 16 {
                    return Err(invalid(key, "more than 16 endpoints"));
                }
                for e in &m.endpoint {
                    check_url(&key, &Some(e.clone()))?;
                    if e.contains(['"', '\\']) {
                        return Err(invalid(key, format!("'{e}' is not a URL")));
                    }
                }
            }
            let creds = c.credentials.as_deref().unwrap_or_default();
            if creds.len() > 64 {
                return Err(invalid("settings.container-registry.credentials", "more than 64 registries"));
            }
            for (i, cr) in creds.iter().enumerate() {
                let key = format!("settings.container-registry.credentials[{i}]");
                if cr.registry.is_empty()
                    || !single_line(&cr.registry, 253)
                    || cr.registry.contains(['"', '\\', ' '])
                {
                    return Err(invalid(format!("{key}.registry"), "not a registry name"));
                }
                for (f, v) in [
                    ("username", &cr.username),
                    ("password", &cr.password),
                    ("auth", &cr.auth),
                    ("identitytoken", &cr.identitytoken),
                ] {
                    if v.as_ref().is_some_and(|v| !single_line(v, 8192)) {
                        return Err(invalid(format!("{key}.{f}"), "must be one line of at most 8 KiB"));
                    }
                }
                if cr.auth.as_ref().is_some_and(|a| super::kubelet::base64_decode(a).is_none()) {
                    return Err(invalid(format!("{key}.auth"), "not base64 (of username:password)"));
                }
                if cr.username.is_some() != cr.password.is_some() {
                    return Err(invalid(key, "username and password go together"));
                }
            }
        }
        if let Some(a) = &self.aws {
            for (f, v) in [("config", &a.config), ("credentials", &a.credentials)] {
                let Some(v) = v else { continue };
                if v.len() > 64 * 1024 {
                    return Err(invalid(format!("settings.aws.{f}"), "longer than 64 KiB"));
                }
                if super::kubelet::base64_decode(v).is_none() {
                    return Err(invalid(format!("settings.aws.{f}"), "not base64"));
                }
            }
            if let Some(p) = &a.profile {
                if p.is_empty() || !single_line(p, 128) || p.contains(char::is_whitespace) {
                    return Err(invalid(
                        "settings.aws.profile",
                        "a profile name: one word of at most 128 bytes",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An image reference as containerd takes it: 1..=512 bytes of `[A-Za-z0-9._:/@-]`, not
/// starting with `-` or `/` (the grammar's characters; containerd checks the rest when it pulls).
pub fn valid_image_ref(r: &str) -> bool {
    (1..=512).contains(&r.len())
        && !r.starts_with(['-', '/'])
        && r.chars().all(|c| c.is_ascii_alphanumeric() || "._:/@-".contains(c))
}

impl Settings {
    pub fn validate(&self) -> Result<(), Invalid> {
        self.validate_more()?;
        if let Some(k) = &self.kubernetes {
            k.validate_tuning()?;
            k.validate_newer()?;
        }
        if let Some(m) = &self.motd {
            if m.len() > 16 * 1024 {
                return Err(invalid("settings.motd", "longer than 16 KiB"));
            }
        }
        if let Some(h) = self.network.as_ref().and_then(|n| n.hostname.as_ref()) {
            if !valid_hostname(h) {
                return Err(invalid("settings.network.hostname", format!("'{h}' is not a valid host name")));
            }
        }
        if let Some(n) = &self.network {
            if let Some(a) = &n.static_address {
                if parse_cidr(a).is_none() {
                    return Err(invalid(
                        "settings.network.static-address",
                        format!("'{a}' is not an IPv4 address/prefix"),
                    ));
                }
            }
            if n.gateway.as_ref().is_some_and(|g| g.parse::<std::net::Ipv4Addr>().is_err()) {
                return Err(invalid("settings.network.gateway", "not an IPv4 address"));
            }
            if n.name_servers.iter().flatten().any(|d| d.parse::<std::net::Ipv4Addr>().is_err()) {
                return Err(invalid("settings.network.name-servers", "not a list of IPv4 addresses"));
            }
            if (n.gateway.is_some() || n.name_servers.is_some()) && n.static_address.is_none() {
                return Err(invalid(
                    "settings.network.static-address",
                    "gateway and name-servers need a static address",
                ));
            }
        }
        for (k, v) in self.kernel.as_ref().and_then(|k| k.sysctl.as_ref()).into_iter().flatten() {
            let key = format!("settings.kernel.sysctl.{k}");
            if !valid_sysctl_key(k) {
                return Err(invalid(key, "not a valid sysctl name"));
            }
            if v.contains(['\n', '\0']) || v.len() > 4096 {
                return Err(invalid(key, "value must be one line of at most 4096 bytes"));
            }
        }
        if let Some(options) = self.ntp.as_ref().and_then(|n| n.options.as_ref()) {
            crate::time::check_options(options).map_err(|e| invalid("settings.ntp.options", e))?;
        }
        if let Some(servers) = self.ntp.as_ref().and_then(|n| n.time_servers.as_ref()) {
            let max = crate::time::MAX_SERVERS;
            if servers.len() > max {
                return Err(invalid("settings.ntp.time-servers", format!("more than {max} servers")));
            }
            for s in servers {
                crate::time::sntp::ServerSpec::parse(s)
                    .map_err(|e| invalid("settings.ntp.time-servers", e))?;
            }
        }
        if let Some(u) = &self.updates {
            check_url("settings.updates.metadata-base-url", &u.metadata_base_url)?;
            check_url("settings.updates.targets-base-url", &u.targets_base_url)?;
            if u.seed.is_some_and(|s| s > 2047) {
                return Err(invalid("settings.updates.seed", "must be in 0..=2047"));
            }
        }
        if let Some(k) = &self.kubernetes {
            check_url("settings.kubernetes.api-server", &k.api_server)?;
            if let Some(c) = &k.cluster_certificate {
                if super::kubelet::base64_decode(c).is_none() {
                    return Err(invalid("settings.kubernetes.cluster-certificate", "not base64"));
                }
            }
            if k.max_pods.is_some_and(|m| m == 0 || m > 10_000) {
                return Err(invalid("settings.kubernetes.max-pods", "must be in 1..=10000"));
            }
            if let Some(ip) = &k.node_ip {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(invalid(
                        "settings.kubernetes.node-ip",
                        format!("'{ip}' is not an IP address"),
                    ));
                }
            }
            if let Some(p) = &k.provider_id {
                if p.len() > MAX_PROVIDER_ID
                    || p.chars().any(|c| c.is_whitespace() || c.is_control())
                    || !p.split_once("://").is_some_and(|(scheme, _)| {
                        !scheme.is_empty()
                            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    })
                {
                    return Err(invalid(
                        "settings.kubernetes.provider-id",
                        format!(
                            "not a provider ID (SCHEME://..., at most {MAX_PROVIDER_ID} bytes, no spaces)"
                        ),
                    ));
                }
            }
            if let Some(i) = &k.pod_infra_container_image {
                if !valid_image_ref(i) {
                    return Err(invalid(
                        "settings.kubernetes.pod-infra-container-image",
                        format!("'{i}' is not an image reference"),
                    ));
                }
            }
            if let Some(ip) = &k.cluster_dns_ip {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(invalid(
                        "settings.kubernetes.cluster-dns-ip",
                        format!("'{ip}' is not an IP address"),
                    ));
                }
            }
        }
        for (name, bundle) in self.pki.iter().flatten() {
            let key = format!("settings.pki.{name}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(key, "name must be 1-64 of [A-Za-z0-9_-]"));
            }
            let Some(data) = &bundle.data else { continue };
            if data.len() > MAX_PKI_DATA {
                return Err(invalid(
                    format!("{key}.data"),
                    format!("longer than {} KiB", MAX_PKI_DATA / 1024),
                ));
            }
            let pem = super::kubelet::base64_decode(data)
                .ok_or_else(|| invalid(format!("{key}.data"), "not base64 (of PEM certificates)"))?;
            crate::http::tls::check_bundle(&pem).map_err(|e| invalid(format!("{key}.data"), e))?;
        }
        if let Some(region) = self.aws.as_ref().and_then(|a| a.region.as_ref()) {
            if !crate::userdata::ec2::valid_region(region) {
                return Err(invalid("settings.aws.region", format!("'{region}' is not an AWS region name")));
            }
        }
        super::bootstrap::validate(self)?;
        super::boot::validate(self)?;
        super::static_pods::validate(self)?;
        for (name, hc) in self.host_containers.iter().flatten() {
            if name.is_empty()
                || name.len() > 63
                || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(invalid(
                    format!("settings.host-containers.{name}"),
                    "name must be 1-63 of [a-z0-9-]",
                ));
            }
            if let Some(data) = &hc.user_data {
                let key = format!("settings.host-containers.{name}.user-data");
                if data.len() > MAX_HOST_CONTAINER_USER_DATA {
                    return Err(invalid(
                        key,
                        format!("longer than {} KiB", MAX_HOST_CONTAINER_USER_DATA / 1024),
                    ));
                }
                if super::kubelet::base64_decode(data).is_none() {
                    return Err(invalid(key, "not base64"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_bottlerocket_shaped_settings() {
        let v = json!({
            "motd": "hi",
            "network": {"hostname": "node-1.example"},
            "kernel": {"sysctl": {"net.ipv4.ip_forward": "1"}},
            "updates": {"metadata-base-url": "http://10.0.2.2:8000/metadata", "seed": 2047, "ignore-waves": true},
            "kubernetes": {"api-server": "https://k8s:6443", "max-pods": 110, "node-taints": {"dedicated": ["gpu:NoSchedule"]},
                "node-ip": "10.0.0.7", "provider-id": "aws:///us-west-2a/i-0123456789abcdef0"},
            "host-containers": {"admin": {"enabled": false, "superpowered": true, "source": "r/admin:1", "user-data": "e30="}},
            "ntp": {"time-servers": ["pool.ntp.org", "169.254.169.123", "10.0.2.2:1123", "[fd00::1]:123"]},
            "container-registry": {"mirrors": [{"registry": "docker.io", "endpoint": ["http://10.0.2.2:5000"]}]},
            "aws": {"region": "us-gov-west-1"}
        });
        let s = parse(&v).unwrap();
        assert_eq!(s.network.unwrap().hostname.unwrap(), "node-1.example");
        assert_eq!(serde_json::to_value(parse(&v).unwrap()).unwrap(), v, "round trip");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"network": {"hostnme": "x"}}), "settings.network.hostnme", "unknown field"),
            (json!({"motd": 5}), "settings.motd", "string"),
            (json!({"bogus": 1}), "settings.bogus", "unknown field"),
            (json!({"network": {"hostname": "-bad-"}}), "settings.network.hostname", "valid host name"),
            (json!({"kernel": {"sysctl": {"../../etc": "1"}}}), "settings.kernel.sysctl.../../etc", "sysctl"),
            (json!({"kernel": {"sysctl": {"vm.x": "a\nb"}}}), "settings.kernel.sysctl.vm.x", "one line"),
            (json!({"updates": {"seed": 2048}}), "settings.updates.seed", "2047"),
            (json!({"network": {"static-address": "10.0.0.5"}}), "settings.network.static-address", "prefix"),
            (json!({"network": {"gateway": "10.0.0.1"}}), "settings.network.static-address", "need a static"),
            (
                json!({"network": {"static-address": "10.0.0.5/24", "name-servers": ["x"]}}),
                "settings.network.name-servers",
                "IPv4",
            ),
            (
                json!({"updates": {"metadata-base-url": "ftp://x"}}),
                "settings.updates.metadata-base-url",
                "URL",
            ),
            (json!({"kubernetes": {"max-pods": 0}}), "settings.kubernetes.max-pods", "1..="),
            (json!({"kubernetes": {"cluster-dns-ip": "10.0.0"}}), "settings.kubernetes.cluster-dns-ip", "IP"),
            (json!({"host-containers": {"Admin": {}}}), "settings.host-containers.Admin", "[a-z0-9-]"),
            (
                json!({"host-containers": {"admin": {"user-data": "%%"}}}),
                "settings.host-containers.admin.user-data",
                "not base64",
            ),
            (
                json!({"host-containers": {"admin": {"user-data": "QUFB".repeat(MAX_HOST_CONTAINER_USER_DATA / 4 + 1)}}}),
                "settings.host-containers.admin.user-data",
                "longer than 64 KiB",
            ),
            (json!({"kubernetes": {"node-ip": "10.0.0.300"}}), "settings.kubernetes.node-ip", "not an IP"),
            (json!({"kubernetes": {"provider-id": "i-123"}}), "settings.kubernetes.provider-id", "SCHEME://"),
            (
                json!({"kubernetes": {"provider-id": "aws:///a b"}}),
                "settings.kubernetes.provider-id",
                "no spaces",
            ),
            (json!({"aws": {"region": "US-WEST-2"}}), "settings.aws.region", "not an AWS region"),
            (json!({"aws": {"profil": "x"}}), "settings.aws.profil", "unknown field"),
            (
                json!({"ntp": {"time-servers": ["a b"]}}),
                "settings.ntp.time-servers",
                "'a b' is not a host name",
            ),
            (json!({"ntp": {"time-servers": ["ntp:0"]}}), "settings.ntp.time-servers", "not a port"),
            (json!({"ntp": {"time-servers": vec!["x"; 17]}}), "settings.ntp.time-servers", "more than 16"),
            (json!({"pki": {"my ca": {"trusted": true}}}), "settings.pki.my ca", "[A-Za-z0-9_-]"),
            (json!({"pki": {"ca": {"data": "%%%"}}}), "settings.pki.ca.data", "not base64"),
            (
                json!({"pki": {"ca": {"data": "aGVsbG8="}}}),
                "settings.pki.ca.data",
                "no '-----BEGIN CERTIFICATE-----'",
            ),
            (json!({"pki": {"ca": {"trusted": "yes"}}}), "settings.pki.ca.trusted", "boolean"),
            (
                json!({"pki": {"ca": {"data": "QUFB".repeat(MAX_PKI_DATA / 4 + 1)}}}),
                "settings.pki.ca.data",
                "longer than",
            ),
            (json!([1, 2]), "settings", "wrong shape"),
            (
                json!({"network": [null, null, null, null, null, null, null, null]}),
                "settings.network",
                "wrong shape",
            ),
        ];
        for (v, key, needle) in cases {
            let e = parse(&v).unwrap_err();
            assert_eq!(e.key, key, "{v}: {e}");
            assert!(e.message.contains(needle), "{v}: {e}");
        }
    }

    /// Every issue-18 key: a good value is accepted (and round-trips), a bad one is refused
    /// naming the key.
    #[test]
    fn bottlerocket_keys_good_and_bad() {
        let mut kube = json!({
            "api-server": "https://k8s:6443", "cluster-domain": "cluster.example",
            "eviction-hard": {"memory.available": "100Mi", "nodefs.available": "10%"},
            "eviction-soft": {"imagefs.inodesFree": "5%"},
            "eviction-soft-grace-period": {"imagefs.inodesFree": "1m30s"},
            "eviction-max-pod-grace-period": 30,
            "kube-reserved": {"cpu": "100m", "memory": "512Mi", "ephemeral-storage": "1Gi"},
            "system-reserved": {"cpu": "0.5", "memory": "1e9"},
            "allowed-unsafe-sysctls": ["net.core.somaxconn", "net.ipv4.*"],
            "registry-qps": 20, "registry-burst": 40, "event-qps": 0, "event-burst": 50,
            "kube-api-qps": 30, "kube-api-burst": 60
        });
        let more = json!({
            "container-log-max-size": "50Mi", "container-log-max-files": 4,
            "cpu-cfs-quota-enforced": false, "cpu-manager-policy": "Static",
            "cpu-manager-reconcile-period": "10s", "topology-manager-scope": "pod",
            "topology-manager-policy": "best-effort", "pod-pids-limit": 4096,
            "image-gc-high-threshold-percent": "85", "image-gc-low-threshold-percent": 80,
            "pod-infra-container-image": "registry.example/pause:3.9",
            "server-tls-bootstrap": false, "shutdown-grace-period": "30s",
            "shutdown-grace-period-for-critical-pods": "10s", "authentication-mode": "tls",
            "seccomp-default": true, "hostname-override": "node-1", "cloud-provider": "external",
            "log-level": 4,
            "credential-providers": {"ecr-credential-provider": {"enabled": true,
                "image-patterns": ["*.dkr.ecr.*.amazonaws.com"], "cache-duration": "12h",
                "environment": {"AWS_REGION": "us-west-2"}}}
        });
        crate::settings::store::merge(&mut kube, &more);
        let good = json!({
            "kubernetes": kube,
            "network": {"https-proxy": "http://proxy.example:3128", "no-proxy": ["10.0.0.0/8", ".internal"]},
            "dns": {"name-servers": ["10.0.2.3", "fd00::53"], "search-list": ["corp.example", "example"]},
            "oci-defaults": {
                "capabilities": {"net-admin": true, "mknod": false},
                "resource-limits": {"max-open-files": {"hard-limit": 4096, "soft-limit": 2048},
                    "max-core-file-size": {"hard-limit": "unlimited", "soft-limit": -1}}
            },
            "container-runtime": {"max-concurrent-downloads": 4, "max-container-log-line-size": -1,
                "enable-unprivileged-ports": true, "enable-unprivileged-icmp": false},
            "container-registry": {
                "mirrors": {"docker.io": ["https://mirror.example"], "*": ["http://10.0.2.2:5000"]},
                "credentials": [{"registry": "docker.io", "username": "u", "password": "p"},
                    {"registry": "r.example", "auth": "dTpw"}, {"registry": "q.example", "identitytoken": "t"}]
            },
            "metrics": {"send-metrics": false},
            "aws": {"region": "us-west-2", "config": "W2RlZmF1bHRdCg==", "credentials": "W2RlZmF1bHRdCg==", "profile": "default"}
        });
        let s = parse_for(&good, Some("aws")).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap(), good, "round trip");
        assert_eq!(s.container_registry.unwrap().mirror_list().len(), 2);

        let k = |v: Value| json!({"kubernetes": v});
        let bad = [
            (k(json!({"cluster-domain": "10.0.0.1"})), "settings.kubernetes.cluster-domain", "DNS domain"),
            (k(json!({"cluster-domain": ".x"})), "settings.kubernetes.cluster-domain", "DNS domain"),
            (
                k(json!({"eviction-hard": {"memory.free": "1Gi"}})),
                "settings.kubernetes.eviction-hard.memory.free",
                "not one of",
            ),
            (
                k(json!({"eviction-hard": {"memory.available": "100%"}})),
                "settings.kubernetes.eviction-hard.memory.available",
                "percentage below 100%",
            ),
            (
                k(json!({"eviction-soft": {"nodefs.available": "lots"}})),
                "settings.kubernetes.eviction-soft.nodefs.available",
                "quantity",
            ),
            (
                k(json!({"eviction-soft-grace-period": {"memory.available": "30"}})),
                "settings.kubernetes.eviction-soft-grace-period.memory.available",
                "duration",
            ),
            (
                k(json!({"eviction-soft-grace-period": {"memory.available": "1s1m"}})),
                "settings.kubernetes.eviction-soft-grace-period.memory.available",
                "duration",
            ),
            (
                k(json!({"eviction-max-pod-grace-period": -1})),
                "settings.kubernetes.eviction-max-pod-grace-period",
                "negative",
            ),
            (
                k(json!({"kube-reserved": {"gpu": "1"}})),
                "settings.kubernetes.kube-reserved.gpu",
                "not one of",
            ),
            (
                k(json!({"system-reserved": {"memory": "1 Gi"}})),
                "settings.kubernetes.system-reserved.memory",
                "quantity",
            ),
            (
                k(json!({"allowed-unsafe-sysctls": ["net..x"]})),
                "settings.kubernetes.allowed-unsafe-sysctls",
                "sysctl",
            ),
            (k(json!({"registry-qps": -5})), "settings.kubernetes.registry-qps", "negative"),
            (k(json!({"kube-api-burst": "ten"})), "settings.kubernetes.kube-api-burst", "i32"),
            (
                k(json!({"container-log-max-size": "10MB"})),
                "settings.kubernetes.container-log-max-size",
                "quantity",
            ),
            (
                k(json!({"container-log-max-files": 1})),
                "settings.kubernetes.container-log-max-files",
                "at least 2",
            ),
            (
                k(json!({"cpu-manager-policy": "dynamic"})),
                "settings.kubernetes.cpu-manager-policy",
                "not one of",
            ),
            (
                k(json!({"cpu-manager-reconcile-period": "soon"})),
                "settings.kubernetes.cpu-manager-reconcile-period",
                "duration",
            ),
            (
                k(json!({"topology-manager-scope": "node"})),
                "settings.kubernetes.topology-manager-scope",
                "not one of",
            ),
            (
                k(json!({"topology-manager-policy": "best"})),
                "settings.kubernetes.topology-manager-policy",
                "not one of",
            ),
            (k(json!({"pod-pids-limit": -2})), "settings.kubernetes.pod-pids-limit", "-1"),
            (
                k(json!({"image-gc-high-threshold-percent": 101})),
                "settings.kubernetes.image-gc-high-threshold-percent",
                "0-100",
            ),
            (
                k(json!({"image-gc-low-threshold-percent": "x"})),
                "settings.kubernetes.image-gc-low-threshold-percent",
                "0-100",
            ),
            (
                k(json!({"image-gc-high-threshold-percent": 50, "image-gc-low-threshold-percent": 60})),
                "settings.kubernetes.image-gc-low-threshold-percent",
                "not be above",
            ),
            (
                k(json!({"pod-infra-container-image": "a b"})),
                "settings.kubernetes.pod-infra-container-image",
                "image reference",
            ),
            (
                k(json!({"server-tls-bootstrap": "yes"})),
                "settings.kubernetes.server-tls-bootstrap",
                "boolean",
            ),
            (
                k(json!({"shutdown-grace-period": "-1s"})),
                "settings.kubernetes.shutdown-grace-period",
                "duration",
            ),
            (
                k(json!({"shutdown-grace-period-for-critical-pods": "1d"})),
                "settings.kubernetes.shutdown-grace-period-for-critical-pods",
                "duration",
            ),
            (k(json!({"seccomp-default": 1})), "settings.kubernetes.seccomp-default", "boolean"),
            (k(json!({"hostname-override": "Node_1"})), "settings.kubernetes.hostname-override", "host name"),
            (k(json!({"cloud-provider": "aws"})), "settings.kubernetes.cloud-provider", "not one of"),
            (k(json!({"log-level": 11})), "settings.kubernetes.log-level", "0-10"),
            (
                k(json!({"credential-providers": {"a b": {}}})),
                "settings.kubernetes.credential-providers.a b",
                "name",
            ),
            (
                k(json!({"credential-providers": {"ecr": {"enabled": true}}})),
                "settings.kubernetes.credential-providers.ecr.image-patterns",
                "at least one",
            ),
            (
                k(json!({"credential-providers": {"ecr": {"cache-duration": "1 day"}}})),
                "settings.kubernetes.credential-providers.ecr.cache-duration",
                "duration",
            ),
            (
                k(json!({"credential-providers": {"ecr": {"environment": {"A-B": "x"}}}})),
                "settings.kubernetes.credential-providers.ecr.environment.A-B",
                "variable name",
            ),
            (json!({"network": {"https-proxy": "http://"}}), "settings.network.https-proxy", "proxy URL"),
            (
                json!({"network": {"https-proxy": "socks5://p:1080"}}),
                "settings.network.https-proxy",
                "proxy URL",
            ),
            (json!({"network": {"no-proxy": ["a,b"]}}), "settings.network.no-proxy", "commas"),
            (
                json!({"network": {"https-proxy": "http://p:3128/path"}}),
                "settings.network.https-proxy",
                "no path",
            ),
            (
                json!({"network": {"https-proxy": "p:3128", "no-proxy": ["10.0.0.0/40"]}}),
                "settings.network.no-proxy",
                "'10.0.0.0/40' is not a host",
            ),
            (
                json!({"dns": {"name-servers": ["8.8.8.8", "1.1.1.1", "9.9.9.9", "8.8.4.4"]}}),
                "settings.dns.name-servers",
                "more than 3",
            ),
            (json!({"dns": {"name-servers": ["dns.example"]}}), "settings.dns.name-servers", "not an IP"),
            (json!({"dns": {"search-list": ["a..b"]}}), "settings.dns.search-list", "domain"),
            (
                json!({"dns": {"search-list": ["a", "b", "c", "d", "e", "f", "g"]}}),
                "settings.dns.search-list",
                "more than 6",
            ),
            (json!({"dns": {"servers": []}}), "settings.dns.servers", "unknown field"),
            (
                json!({"oci-defaults": {"capabilities": {"CAP_NET_ADMIN": true}}}),
                "settings.oci-defaults.capabilities.CAP_NET_ADMIN",
                "not a capability",
            ),
            (
                json!({"oci-defaults": {"capabilities": {"net-admin": "yes"}}}),
                "settings.oci-defaults.capabilities.net-admin",
                "boolean",
            ),
            (
                json!({"oci-defaults": {"resource-limits": {"max-files": {"hard-limit": 1, "soft-limit": 1}}}}),
                "settings.oci-defaults.resource-limits.max-files",
                "not a resource limit",
            ),
            (
                json!({"oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": 1}}}}),
                "settings.oci-defaults.resource-limits.max-open-files",
                "soft-limit",
            ),
            (
                json!({"oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": -2, "soft-limit": 1}}}}),
                "settings.oci-defaults.resource-limits.max-open-files",
                "non-negative",
            ),
            (
                json!({"oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": 10, "soft-limit": "unlimited"}}}}),
                "settings.oci-defaults.resource-limits.max-open-files.soft-limit",
                "hard-limit",
            ),
            (
                json!({"container-runtime": {"max-concurrent-downloads": -1}}),
                "settings.container-runtime.max-concurrent-downloads",
                "negative",
            ),
            (
                json!({"container-runtime": {"max-container-log-line-size": -2}}),
                "settings.container-runtime.max-container-log-line-size",
                "-1",
            ),
            (
                json!({"container-runtime": {"snapshotter": "x"}}),
                "settings.container-runtime.snapshotter",
                "unknown field",
            ),
            (
                json!({"container-registry": {"mirrors": {"docker.io": ["ftp://m"]}}}),
                "settings.container-registry.mirrors.docker.io",
                "URL",
            ),
            (
                json!({"container-registry": {"mirrors": {"docker.io": "https://m"}}}),
                "settings.container-registry.mirrors",
                "did not match",
            ),
            (
                json!({"container-registry": {"credentials": [{"registry": "r", "username": "u"}]}}),
                "settings.container-registry.credentials[0]",
                "go together",
            ),
            (
                json!({"container-registry": {"credentials": [{"registry": "r", "auth": "%%"}]}}),
                "settings.container-registry.credentials[0].auth",
                "base64",
            ),
            (
                json!({"container-registry": {"credentials": [{"registry": "r", "password": "a\nb", "username": "u"}]}}),
                "settings.container-registry.credentials[0].password",
                "one line",
            ),
            (json!({"aws": {"config": "%%"}}), "settings.aws.config", "not base64"),
            (json!({"aws": {"profile": "a b"}}), "settings.aws.profile", "one word"),
        ];
        for (v, key, needle) in bad {
            let e = parse_for(&v, Some("aws")).unwrap_err();
            assert_eq!(e.key, key, "{v}: {e}");
            assert!(e.message.contains(needle), "{v}: {e}");
        }
    }

    /// Bottlerocket's newer keys: network.hosts, ntp.options and the newer kubelet keys.
    #[test]
    fn newer_bottlerocket_keys_good_and_bad() {
        let good = json!({
            "kubernetes": {
                "api-server": "https://k8s:6443", "cpu-manager-policy": "static",
                "reserved-cpus": "0-1,4", "memory-manager-policy": "static",
                "memory-manager-reserved-memory": {
                    "0": {"enabled": true, "memory": "1349Mi", "hugepages-2Mi": "64Mi"},
                    "1": {"enabled": false, "memory": "1Gi"}
                },
                "cpu-manager-policy-options": ["full-pcpus-only"], "memory-swap-behavior": "LimitedSwap",
                "image-maximum-gc-age": "168h", "image-minimum-gc-age": "2m",
                "container-log-max-workers": 2, "container-log-monitor-interval": "10s",
                "max-parallel-image-pulls": 3, "single-process-oom-kill": true
            },
            "network": {"hosts": [["10.0.0.1", ["db", "db.corp.example"]], ["fd00::1", ["v6host"]]]},
            "ntp": {"time-servers": ["pool.ntp.org"], "options": ["iburst", "prefer"]}
        });
        let s = parse_for(&good, None).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap(), good, "round trip");
        let k = |v: Value| json!({"kubernetes": v});
        let bad = [
            (k(json!({"reserved-cpus": "3-1"})), "settings.kubernetes.reserved-cpus", "not a CPU list"),
            (k(json!({"reserved-cpus": "0,0"})), "settings.kubernetes.reserved-cpus", "ascending"),
            (k(json!({"reserved-cpus": "a"})), "settings.kubernetes.reserved-cpus", "not a CPU list"),
            (
                k(json!({"memory-manager-policy": "dynamic"})),
                "settings.kubernetes.memory-manager-policy",
                "not one of",
            ),
            (
                k(json!({"memory-manager-reserved-memory": {"x": {"enabled": true, "memory": "1Gi"}}})),
                "settings.kubernetes.memory-manager-reserved-memory.x",
                "NUMA node number",
            ),
            (
                k(json!({"memory-manager-reserved-memory": {"0": {"enabled": true}}})),
                "settings.kubernetes.memory-manager-reserved-memory.0",
                "needs memory",
            ),
            (
                k(json!({"memory-manager-reserved-memory": {"0": {"enabled": true, "memory": "1 G"}}})),
                "settings.kubernetes.memory-manager-reserved-memory.0.memory",
                "not a quantity",
            ),
            (
                k(json!({"memory-manager-reserved-memory": {"0": {"enabled": true, "cpu": "1"}}})),
                "settings.kubernetes.memory-manager-reserved-memory.0.cpu",
                "unknown field",
            ),
            (
                k(json!({"cpu-manager-policy": "static", "cpu-manager-policy-options": ["align-by-socket"]})),
                "settings.kubernetes.cpu-manager-policy-options",
                "full-pcpus-only",
            ),
            (
                k(json!({"cpu-manager-policy-options": ["full-pcpus-only"]})),
                "settings.kubernetes.cpu-manager-policy-options",
                "only with cpu-manager-policy",
            ),
            (
                k(json!({"memory-swap-behavior": "UnlimitedSwap"})),
                "settings.kubernetes.memory-swap-behavior",
                "not one of",
            ),
            (
                k(json!({"image-maximum-gc-age": "1 week"})),
                "settings.kubernetes.image-maximum-gc-age",
                "duration",
            ),
            (
                k(json!({"image-minimum-gc-age": "10"})),
                "settings.kubernetes.image-minimum-gc-age",
                "duration",
            ),
            (
                k(json!({"max-parallel-image-pulls": 0})),
                "settings.kubernetes.max-parallel-image-pulls",
                "at least 1",
            ),
            (
                k(json!({"container-log-max-workers": -1})),
                "settings.kubernetes.container-log-max-workers",
                "at least 1",
            ),
            (
                json!({"network": {"hosts": [["10.0.0.300", ["a"]]]}}),
                "settings.network.hosts",
                "not an IP address",
            ),
            (
                json!({"network": {"hosts": [["10.0.0.1", []]]}}),
                "settings.network.hosts",
                "between 1 and 16 names",
            ),
            (
                json!({"network": {"hosts": [["10.0.0.1", ["a b"]]]}}),
                "settings.network.hosts",
                "'a b' is not a host name",
            ),
            (json!({"network": {"hosts": [["10.0.0.1"]]}}), "settings.network.hosts[0]", "invalid length"),
            (
                json!({"ntp": {"options": ["minpoll", "4"]}}),
                "settings.ntp.options",
                "sets its own poll interval",
            ),
            (
                json!({"ntp": {"options": ["maxpoll 10"]}}),
                "settings.ntp.options",
                "'maxpoll' is not supported",
            ),
            (json!({"ntp": {"options": ["nts"]}}), "settings.ntp.options", "no authenticated NTP"),
            (json!({"ntp": {"options": ["xleave"]}}), "settings.ntp.options", "only iburst and prefer"),
        ];
        for (v, key, needle) in bad {
            let e = parse_for(&v, None).unwrap_err();
            assert_eq!(e.key, key, "{v}: {e}");
            assert!(e.message.contains(needle), "{v}: {e}");
        }
    }

    /// Bottlerocket keys with no meaning on Berth: refused with the reason and the
    /// alternative, whatever their value; aws keys only on the aws variant.
    #[test]
    fn bottlerocket_keys_refused_with_reasons() {
        let cases = [
            (json!({"metrics": {"send-metrics": true}}), "settings.metrics.send-metrics", "sends no metrics"),
            (
                json!({"metrics": {"metrics-url": "https://m"}}),
                "settings.metrics.metrics-url",
                "GET /services",
            ),
            (
                json!({"metrics": {"service-checks": ["kubelet"]}}),
                "settings.metrics.service-checks",
                "sends no metrics",
            ),
            (json!({"ecs": {"cluster": "c"}}), "settings.ecs", "no ECS variant"),
            (json!({"autoscaling": {"should-wait": true}}), "settings.autoscaling", "lifecycle hooks"),
            (json!({"cloudformation": {"should-signal": true}}), "settings.cloudformation", "CloudFormation"),
            (json!({"oci-hooks": {"log4j-hotpatch-enabled": false}}), "settings.oci-hooks", "remove the key"),
            (json!({"nvidia-container-runtime": {}}), "settings.nvidia-container-runtime", "NVIDIA"),
            (json!({"kubelet-device-plugins": {}}), "settings.kubelet-device-plugins", "NVIDIA"),
            (
                json!({"kernel": {"modules": {"sctp": {"allowed": false}}}}),
                "settings.kernel.modules",
                "built in",
            ),
            (
                json!({"kubernetes": {"hostname-override-source": "instance-id"}}),
                "settings.kubernetes.hostname-override-source",
                "hostname-override",
            ),
            (
                json!({"kubernetes": {"authentication-mode": "aws"}}),
                "settings.kubernetes.authentication-mode",
                "aws-iam-authenticator",
            ),
        ];
        for (v, key, needle) in cases {
            for variant in [None, Some("aws"), Some("qemu")] {
                let e = parse_for(&v, variant).unwrap_err();
                assert_eq!(e.key, key, "{v}: {e}");
                assert!(e.message.contains(needle), "{v}: {e}");
            }
        }
        let aws = json!({"aws": {"region": "us-west-2", "profile": "p"}});
        assert!(parse_for(&aws, Some("aws")).is_ok());
        assert!(parse_for(&aws, None).is_ok(), "host tools and dev mode take every variant's keys");
        let e = parse_for(&aws, Some("qemu")).unwrap_err();
        assert_eq!(e.key, "settings.aws");
        assert!(e.message.contains("only on the aws variant (this is the qemu variant)"), "{e}");
        // Unknown keys stay unknown.
        let e = parse_for(&json!({"kubernetes": {"no-such-key": 1}}), Some("aws")).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn quantities_thresholds_durations() {
        for (q, ok) in [
            ("100m", true),
            ("1Gi", true),
            ("1.5", true),
            ("129e6", true),
            ("1G", true),
            ("", false),
            ("1GB", false),
            ("-1", false),
            ("1.", false),
            ("e5", false),
        ] {
            assert_eq!(valid_quantity(q), ok, "{q}");
        }
        for (t, ok) in [("10%", true), ("99.9%", true), ("100%", false), ("x%", false), ("1Gi", true)] {
            assert_eq!(valid_threshold(t), ok, "{t}");
        }
        for (d, ok) in [
            ("1h", true),
            ("1h2m3s4ms", true),
            ("0.5s", true),
            ("90m", true),
            ("1m1h", false),
            ("1s1s", false),
            ("", false),
            ("5", false),
            ("1d", false),
            ("ms", false),
        ] {
            assert_eq!(valid_duration(d), ok, "{d}");
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let keys = prop_oneof![
            Just("motd".to_string()),
            Just("network".to_string()),
            Just("hostname".to_string()),
            Just("kernel".to_string()),
            Just("sysctl".to_string()),
            Just("updates".to_string()),
            Just("seed".to_string()),
            Just("host-containers".to_string()),
            Just("enabled".to_string()),
            "[a-z.-]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(keys.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn strip_nulls(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter().filter(|(_, x)| !x.is_null()).map(|(k, x)| (k.clone(), strip_nulls(x))).collect(),
            ),
            other => other.clone(),
        }
    }

    proptest::proptest! {
        /// Any JSON at all: parse answers Ok or a keyed error, never panics, and whatever it
        /// accepts round-trips and passes validation.
        #[test]
        fn parse_never_panics_and_accepts_only_valid(v in arb_json()) {
            if let Ok(s) = parse(&v) {
                proptest::prop_assert!(s.validate().is_ok());
                // `null` means "not set", so it does not come back.
                proptest::prop_assert_eq!(serde_json::to_value(&s).unwrap(), strip_nulls(&v));
            }
        }
    }

    #[test]
    fn pki_bundles_take_base64_pem_certificates() {
        let pem = crate::http::testing::TestCa::new("Berth test CA").pem();
        let data = crate::http::testing::base64(pem.as_bytes());
        let v = json!({"pki": {"my-ca": {"data": data, "trusted": true}, "distrust_this": {"data": data}}});
        let s = parse(&v).unwrap();
        assert_eq!(s.pki.as_ref().unwrap()["my-ca"].trusted, Some(true));
        assert_eq!(serde_json::to_value(s).unwrap(), v, "round trip");
    }

    #[test]
    fn hostnames_and_sysctl_names() {
        for (h, ok) in [
            ("a", true),
            ("a.b-c", true),
            ("", false),
            ("a..b", false),
            ("a_b", false),
            (&"x".repeat(64), false),
        ] {
            assert_eq!(valid_hostname(h), ok, "{h}");
        }
        for (k, ok) in [
            ("net.ipv4.ip_forward", true),
            ("net/ipv4/conf/eth0/rp_filter", true),
            ("", false),
            ("a..b", false),
            ("a b", false),
            ("..", false),
        ] {
            assert_eq!(valid_sysctl_key(k), ok, "{k}");
        }
    }
}
