//! kubelet's configuration, rendered from `settings.kubernetes.*`: the KubeletConfiguration
//! (`kubelet.config.k8s.io/v1beta1`, written as JSON, which is valid YAML), the cluster CA,
//! the bootstrap kubeconfig with the bootstrap token, and kubelet's command line.
//!
//! kubelet is configured when `settings.kubernetes.api-server` is set (joining a cluster) or
//! `standalone-mode` is true (static pods only). No registry reachable here ships kubelet:
//! the image includes one when the build is given one (`KUBELET=/path scripts/run`),
//! otherwise the service is reported absent.

use serde_json::{json, Value};

use super::model::{Kubernetes, Settings};

pub const CONFIG: &str = "kubernetes/kubelet/config.json";
pub const CA: &str = "kubernetes/pki/ca.crt";
pub const BOOTSTRAP: &str = "kubernetes/bootstrap-kubeconfig";
pub const KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
pub const BINARY: &str = "/usr/bin/kubelet";
/// The CredentialProviderConfig (`settings.kubernetes.credential-providers`), under /etc.
pub const CREDENTIAL_PROVIDER_CONFIG: &str = "kubernetes/kubelet/credential-provider-config.json";
/// Where kubelet looks for credential provider plugins (Bottlerocket's directory); the image
/// must ship each enabled provider's binary there.
pub const CREDENTIAL_PROVIDER_BIN_DIR: &str = "/usr/libexec/kubernetes/kubelet/plugins";

pub fn configured(s: &Settings) -> Option<&Kubernetes> {
    s.kubernetes.as_ref().filter(|k| k.api_server.is_some() || k.standalone_mode == Some(true))
}

fn standalone(k: &Kubernetes) -> bool {
    k.standalone_mode == Some(true)
}

/// Decode standard base64 (the cluster certificate is given base64-encoded, as in
/// Bottlerocket): the standard alphabet with its `=` padding; whitespace (the line breaks of a
/// wrapped value) is ignored.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).ok()
}

/// The KubeletConfiguration object.
pub fn config(k: &Kubernetes) -> Value {
    let taints: Vec<Value> = k
        .node_taints
        .iter()
        .flatten()
        .flat_map(|(key, values)| {
            values.iter().map(move |v| {
                let (value, effect) = v.split_once(':').unwrap_or(("", v.as_str()));
                json!({"key": key, "value": value, "effect": effect})
            })
        })
        .collect();
    let mut c = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "0.0.0.0",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": !standalone(k), "cacheTTL": "2m0s"},
            "x509": {"clientCAFile": format!("/etc/{CA}")}
        },
        "authorization": {"mode": if standalone(k) { "AlwaysAllow" } else { "Webhook" }},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": "/",
        "clusterDomain": "cluster.local",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "maxPods": k.max_pods.unwrap_or(110),
        "resolvConf": "/etc/resolv.conf",
        "rotateCertificates": true,
        "serverTLSBootstrap": !standalone(k),
        "staticPodPath": "/etc/kubernetes/static-pods",
        "registerWithTaints": taints,
        "volumePluginDir": "/var/lib/kubelet/plugins/volume/exec",
    });
    if let Some(ip) = &k.cluster_dns_ip {
        c["clusterDNS"] = json!([ip]);
    }
    if let Some(id) = &k.provider_id {
        c["providerID"] = json!(id);
    }
    tuning(k, &mut c);
    c
}

/// The Bottlerocket tuning keys, each to its KubeletConfiguration field (written only when
/// set, so kubelet's defaults stay kubelet's).
fn tuning(k: &Kubernetes, c: &mut Value) {
    let mut set = |field: &str, v: Option<Value>| {
        if let Some(v) = v {
            c[field] = v;
        }
    };
    set("clusterDomain", k.cluster_domain.as_ref().map(|d| json!(d)));
    set("evictionHard", k.eviction_hard.as_ref().map(|m| json!(m)));
    set("evictionSoft", k.eviction_soft.as_ref().map(|m| json!(m)));
    set("evictionSoftGracePeriod", k.eviction_soft_grace_period.as_ref().map(|m| json!(m)));
    set("evictionMaxPodGracePeriod", k.eviction_max_pod_grace_period.map(|n| json!(n)));
    set("kubeReserved", k.kube_reserved.as_ref().map(|m| json!(m)));
    set("systemReserved", k.system_reserved.as_ref().map(|m| json!(m)));
    set("allowedUnsafeSysctls", k.allowed_unsafe_sysctls.as_ref().map(|l| json!(l)));
    set("registryPullQPS", k.registry_qps.map(|n| json!(n)));
    set("registryBurst", k.registry_burst.map(|n| json!(n)));
    set("eventRecordQPS", k.event_qps.map(|n| json!(n)));
    set("eventBurst", k.event_burst.map(|n| json!(n)));
    set("kubeAPIQPS", k.kube_api_qps.map(|n| json!(n)));
    set("kubeAPIBurst", k.kube_api_burst.map(|n| json!(n)));
    set("containerLogMaxSize", k.container_log_max_size.as_ref().map(|q| json!(q)));
    set("containerLogMaxFiles", k.container_log_max_files.map(|n| json!(n)));
    set("cpuCFSQuota", k.cpu_cfs_quota_enforced.map(|b| json!(b)));
    // kubelet takes the policy names in lowercase; Bottlerocket also accepts them capitalised.
    set("cpuManagerPolicy", k.cpu_manager_policy.as_ref().map(|p| json!(p.to_lowercase())));
    set("cpuManagerReconcilePeriod", k.cpu_manager_reconcile_period.as_ref().map(|d| json!(d)));
    set("topologyManagerScope", k.topology_manager_scope.as_ref().map(|v| json!(v)));
    set("topologyManagerPolicy", k.topology_manager_policy.as_ref().map(|v| json!(v)));
    set("podPidsLimit", k.pod_pids_limit.map(|n| json!(n)));
    let gc = |v: &Option<Value>| v.as_ref().and_then(super::model::gc_percent).map(|n| json!(n));
    set("imageGCHighThresholdPercent", gc(&k.image_gc_high_threshold_percent));
    set("imageGCLowThresholdPercent", gc(&k.image_gc_low_threshold_percent));
    if !standalone(k) {
        set("serverTLSBootstrap", k.server_tls_bootstrap.map(|b| json!(b)));
    }
    set("shutdownGracePeriod", k.shutdown_grace_period.as_ref().map(|d| json!(d)));
    set(
        "shutdownGracePeriodCriticalPods",
        k.shutdown_grace_period_for_critical_pods.as_ref().map(|d| json!(d)),
    );
    set("seccompDefault", k.seccomp_default.map(|b| json!(b)));
    newer(k, c);
}

/// Bottlerocket's newer keys, each to its KubeletConfiguration field (only when set).
fn newer(k: &Kubernetes, c: &mut Value) {
    let mut set = |field: &str, v: Option<Value>| {
        if let Some(v) = v {
            c[field] = v;
        }
    };
    set("reservedSystemCPUs", k.reserved_cpus.as_ref().map(|v| json!(v)));
    // kubelet takes `Static` and `None`; Bottlerocket also accepts them in lowercase.
    let policy = k.memory_manager_policy.as_deref().map(|p| {
        if p.eq_ignore_ascii_case("static") {
            "Static"
        } else {
            "None"
        }
    });
    set("memoryManagerPolicy", policy.map(|p| json!(p)));
    let reserved: Vec<Value> = k
        .memory_manager_reserved_memory
        .iter()
        .flatten()
        .filter(|(_, r)| r.enabled == Some(true))
        .filter_map(|(node, r)| {
            let limits: serde_json::Map<String, Value> =
                r.limits().into_iter().map(|(n, q)| (n.to_string(), json!(q))).collect();
            Some(json!({"numaNode": node.parse::<u32>().ok()?, "limits": limits}))
        })
        .collect();
    set("reservedMemory", (!reserved.is_empty()).then(|| json!(reserved)));
    let options = k.cpu_manager_policy_options.as_deref().unwrap_or_default();
    let options: serde_json::Map<String, Value> =
        options.iter().map(|o| (o.clone(), json!("true"))).collect();
    set("cpuManagerPolicyOptions", (!options.is_empty()).then(|| json!(options)));
    set("memorySwap", k.memory_swap_behavior.as_ref().map(|b| json!({"swapBehavior": b})));
    set("imageMaximumGCAge", k.image_maximum_gc_age.as_ref().map(|d| json!(d)));
    set("imageMinimumGCAge", k.image_minimum_gc_age.as_ref().map(|d| json!(d)));
    set("containerLogMaxWorkers", k.container_log_max_workers.map(|n| json!(n)));
    set("containerLogMonitorInterval", k.container_log_monitor_interval.as_ref().map(|d| json!(d)));
    // kubelet pulls in parallel only when serial pulls are off.
    if let Some(n) = k.max_parallel_image_pulls {
        set("serializeImagePulls", Some(json!(false)));
        set("maxParallelImagePulls", Some(json!(n)));
    }
    set("singleProcessOOMKill", k.single_process_oom_kill.map(|b| json!(b)));
}

/// The enabled credential providers, by name.
fn enabled_providers(k: &Kubernetes) -> impl Iterator<Item = (&String, &super::model::CredentialProvider)> {
    k.credential_providers.iter().flatten().filter(|(_, p)| p.enabled == Some(true))
}

/// The CredentialProviderConfig (`kubelet.config.k8s.io/v1`) for the enabled providers;
/// empty when none is.
pub fn credential_provider_config(k: &Kubernetes) -> String {
    let providers: Vec<Value> = enabled_providers(k)
        .map(|(name, p)| {
            let env: Vec<Value> =
                p.environment.iter().flatten().map(|(n, v)| json!({"name": n, "value": v})).collect();
            json!({
                "name": name,
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "matchImages": p.image_patterns.clone().unwrap_or_default(),
                "defaultCacheDuration": p.cache_duration.clone().unwrap_or_else(|| "12h".into()),
                "env": env,
            })
        })
        .collect();
    if providers.is_empty() {
        return String::new();
    }
    let v = json!({"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig", "providers": providers});
    serde_json::to_string_pretty(&v).expect("JSON serializes")
}

/// The bootstrap kubeconfig (kubelet exchanges the token for a client certificate).
pub fn bootstrap_kubeconfig(k: &Kubernetes) -> String {
    let cluster = k.cluster_name.as_deref().unwrap_or("kubernetes");
    let v = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": k.api_server.clone().unwrap_or_default(),
            "certificate-authority": format!("/etc/{CA}")}}],
        "users": [{"name": "kubelet-bootstrap", "user": {"token": k.bootstrap_token.clone().unwrap_or_default()}}],
        "contexts": [{"name": "kubelet", "context": {"cluster": cluster, "user": "kubelet-bootstrap"}}],
        "current-context": "kubelet",
    });
    serde_json::to_string_pretty(&v).expect("JSON serializes")
}

/// kubelet's command line.
pub fn argv(k: &Kubernetes) -> Vec<String> {
    let mut a = vec![BINARY.to_string(), format!("--config=/etc/{CONFIG}")];
    if !standalone(k) {
        a.push(format!("--kubeconfig={KUBECONFIG}"));
        a.push(format!("--bootstrap-kubeconfig=/etc/{BOOTSTRAP}"));
    }
    if let Some(ip) = &k.node_ip {
        a.push(format!("--node-ip={ip}"));
    }
    if let Some(h) = &k.hostname_override {
        a.push(format!("--hostname-override={h}"));
    }
    if let Some(p) = &k.cloud_provider {
        a.push(format!("--cloud-provider={p}"));
    }
    if let Some(v) = k.log_level {
        a.push(format!("-v={v}"));
    }
    if enabled_providers(k).next().is_some() {
        a.push(format!("--image-credential-provider-config=/etc/{CREDENTIAL_PROVIDER_CONFIG}"));
        a.push(format!("--image-credential-provider-bin-dir={CREDENTIAL_PROVIDER_BIN_DIR}"));
    }
    if let Some(labels) = &k.node_labels {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !l.is_empty() {
            a.push(format!("--node-labels={}", l.join(",")));
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::model::parse;

    fn k8s() -> Kubernetes {
        let s = parse(&json!({"kubernetes": {
            "api-server": "https://10.0.0.1:6443",
            "cluster-name": "prod",
            "cluster-certificate": "aGVsbG8=",
            "bootstrap-token": "abcdef.0123456789abcdef",
            "node-labels": {"tier": "web", "zone": "a"},
            "node-taints": {"dedicated": ["gpu:NoSchedule", "x:NoExecute"]},
            "max-pods": 42,
            "cluster-dns-ip": "10.96.0.10",
            "node-ip": "10.0.0.7",
            "provider-id": "aws:///us-west-2a/i-0123456789abcdef0"}}))
        .unwrap();
        s.kubernetes.unwrap()
    }

    /// Field names of KubeletConfiguration v1beta1 (k8s.io/kubelet/config/v1beta1) used here.
    const DOCUMENTED: &[&str] = &[
        "apiVersion",
        "kind",
        "address",
        "authentication",
        "authorization",
        "cgroupDriver",
        "cgroupRoot",
        "clusterDomain",
        "clusterDNS",
        "containerRuntimeEndpoint",
        "maxPods",
        "resolvConf",
        "rotateCertificates",
        "serverTLSBootstrap",
        "staticPodPath",
        "registerWithTaints",
        "volumePluginDir",
        "providerID",
        "evictionHard",
        "evictionSoft",
        "evictionSoftGracePeriod",
        "evictionMaxPodGracePeriod",
        "kubeReserved",
        "systemReserved",
        "allowedUnsafeSysctls",
        "registryPullQPS",
        "registryBurst",
        "eventRecordQPS",
        "eventBurst",
        "kubeAPIQPS",
        "kubeAPIBurst",
        "containerLogMaxSize",
        "containerLogMaxFiles",
        "cpuCFSQuota",
        "cpuManagerPolicy",
        "cpuManagerReconcilePeriod",
        "topologyManagerScope",
        "topologyManagerPolicy",
        "podPidsLimit",
        "imageGCHighThresholdPercent",
        "imageGCLowThresholdPercent",
        "shutdownGracePeriod",
        "shutdownGracePeriodCriticalPods",
        "seccompDefault",
    ];

    #[test]
    fn kubelet_configuration_uses_documented_fields() {
        let c = config(&k8s());
        let text = serde_json::to_string(&c).unwrap();
        let back: Value = serde_json::from_str(&text).expect("valid JSON");
        for key in back.as_object().unwrap().keys() {
            assert!(DOCUMENTED.contains(&key.as_str()), "undocumented field {key}");
        }
        assert_eq!(back["kind"], "KubeletConfiguration");
        assert_eq!(back["maxPods"], 42);
        assert_eq!(back["clusterDNS"], json!(["10.96.0.10"]));
        assert_eq!(back["providerID"], "aws:///us-west-2a/i-0123456789abcdef0");
        assert_eq!(back["authorization"]["mode"], "Webhook");
        assert_eq!(
            back["registerWithTaints"][1],
            json!({"key": "dedicated", "value": "x", "effect": "NoExecute"})
        );
    }

    #[test]
    fn bootstrap_and_argv() {
        let k = k8s();
        let kc: Value = serde_json::from_str(&bootstrap_kubeconfig(&k)).unwrap();
        assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://10.0.0.1:6443");
        assert_eq!(kc["users"][0]["user"]["token"], "abcdef.0123456789abcdef");
        let a = argv(&k).join(" ");
        assert!(a.contains("--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubeconfig"), "{a}");
        assert!(a.contains("--node-labels=tier=web,zone=a"), "{a}");
        assert!(a.contains("--node-ip=10.0.0.7"), "{a}");
        let mut sa = k.clone();
        sa.standalone_mode = Some(true);
        assert!(!argv(&sa).join(" ").contains("kubeconfig"));
        assert_eq!(config(&sa)["authorization"]["mode"], "AlwaysAllow");
    }

    #[test]
    fn base64_table() {
        for (enc, dec) in [
            ("", Some(&b""[..])),
            ("aGVsbG8=", Some(b"hello")),
            ("aGk=", Some(b"hi")),
            ("YQ==", Some(b"a")),
            ("aGVs\nbG8=", Some(b"hello")),
        ] {
            assert_eq!(base64_decode(enc).as_deref(), dec, "{enc}");
        }
        // "aGl=" has bits set after its last byte: not what an encoder writes.
        for bad in ["a", "a===", "=aaa", "aG!k", "aGk", "aGl="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }
}
