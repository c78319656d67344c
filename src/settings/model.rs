//! The typed settings model. Key names follow Bottlerocket's where the meaning is the same
//! (kebab-case; `settings.network.hostname`, `settings.kernel.sysctl`, ...). Unknown keys are
//! rejected, and [`parse`] names the full path of whatever is wrong.
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
}

/// `settings.aws`: Bottlerocket's key; only the region so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Aws {
    /// The instance's region (`us-west-2`); on EC2 generated from the identity document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
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
    /// The node's IP address for kubelet (`--node-ip`); on EC2 generated from IMDS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    /// The node's provider ID (`providerID`), `aws:///ZONE/INSTANCE-ID` on EC2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// The pod sandbox ("pause") image: containerd's `sandbox_image` (Bottlerocket's key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_infra_container_image: Option<String>,
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
    pub mirrors: Option<Vec<Mirror>>,
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

/// Deserialize and validate settings from JSON, naming the failing key (`settings.x.y`).
pub fn parse(value: &Value) -> Result<Settings, Invalid> {
    if !value.is_object() {
        return Err(invalid("settings", "wrong shape: expected an object of settings"));
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

/// An image reference as containerd takes it: 1..=512 bytes of `[A-Za-z0-9._:/@-]`, not
/// starting with `-` or `/` (the grammar's characters; containerd checks the rest when it pulls).
pub fn valid_image_ref(r: &str) -> bool {
    (1..=512).contains(&r.len())
        && !r.starts_with(['-', '/'])
        && r.chars().all(|c| c.is_ascii_alphanumeric() || "._:/@-".contains(c))
}

impl Settings {
    pub fn validate(&self) -> Result<(), Invalid> {
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
            (json!({"aws": {"profile": "x"}}), "settings.aws.profile", "unknown field"),
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
            (json!({"network": [null, null, null, null, null]}), "settings.network", "wrong shape"),
        ];
        for (v, key, needle) in cases {
            let e = parse(&v).unwrap_err();
            assert_eq!(e.key, key, "{v}: {e}");
            assert!(e.message.contains(needle), "{v}: {e}");
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
