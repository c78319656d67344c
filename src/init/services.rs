//! The services PID 1 supervises, declared as data: containerd (with the configuration
//! rendered from settings under /etc/containerd), kubelet when `settings.kubernetes` configures
//! it, one `host-containers@NAME` per enabled host
//! container, and the self-test services that QEMU tests switch on with `berth.selftest=`.

use std::sync::{Arc, Mutex};

use super::Ctx;
use crate::settings::model::Settings;
use crate::settings::render;
use crate::supervisor::{Ready, Restart, ServiceSpec, Supervisor};
use crate::sys::CapabilitySet;

pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
const CONTAINERD: &str = "/usr/bin/containerd";

fn containerd(settings: &Settings) -> ServiceSpec {
    let mut s = ServiceSpec::new("containerd", &[CONTAINERD, "--config", "/etc/containerd/config.toml"]);
    s.ready = Ready::ContainerdVersion(CONTAINERD_SOCKET.into());
    // The trust bundle rendered in /etc from the image's CAs and settings.pki.
    s.env.push(("SSL_CERT_FILE".into(), crate::http::tls::TRUST_BUNDLE.into()));
    s.env.extend(render::proxy_env(settings));
    s
}

/// `berth.selftest=crashloop`: a service that fails at once, every time, so the backoff can be
/// watched through the API.
fn crashloop() -> ServiceSpec {
    let mut s = ServiceSpec::new("crashloop", &["/usr/bin/berth", "selftest", "crash"]);
    s.restart = Restart::Always;
    s.caps = Some(CapabilitySet::empty()); // needs none
    s
}

/// `berth.selftest=orphans`: a one-shot task (see `init::selftest`).
fn orphans() -> ServiceSpec {
    let mut s = ServiceSpec::new("selftest-orphans", &["/usr/bin/berth", "selftest", "orphans"]);
    s.restart = Restart::Never;
    s.caps = Some(CapabilitySet::empty()); // fork, read /proc and write the console: no capability needed
    s
}

/// `berth.selftest=logflood`: a service whose output is hostile (see `init::selftest`).
fn logflood() -> ServiceSpec {
    let mut s = ServiceSpec::new("selftest-logflood", &["/usr/bin/berth", "selftest", "logflood"]);
    s.restart = Restart::Never;
    s.caps = Some(CapabilitySet::empty());
    s
}

/// `berth.selftest=apiflood`: a hostile API client (see `init::selftest`).
fn apiflood() -> ServiceSpec {
    let mut s = ServiceSpec::new("selftest-apiflood", &["/usr/bin/berth", "selftest", "apiflood"]);
    s.restart = Restart::Never;
    s.caps = Some(CapabilitySet::empty()); // root owns the API socket: no capability needed
    s
}

const HOST_CONTAINER_PREFIX: &str = "host-containers@";

fn host_container(
    name: &str,
    source: &str,
    superpowered: bool,
    plain_http: bool,
    user_data: Option<&str>,
    env: Vec<(String, String)>,
) -> ServiceSpec {
    let flag = |b: bool| if b { "1" } else { "0" };
    let mut s = ServiceSpec::new(
        &format!("{HOST_CONTAINER_PREFIX}{name}"),
        &["/usr/bin/berth", "host-container", name, source, flag(superpowered), flag(plain_http)],
    );
    s.deps = vec!["containerd".into()];
    s.env.extend(env);
    if let Some(data) = user_data {
        s.env.push((crate::supervisor::host_container::USER_DATA_ENV.into(), data.into()));
    }
    s
}

/// Whether `settings.container-registry.mirrors` configures `registry` as insecure: one of its
/// endpoints is plain `http://`.
pub(super) fn insecure_registry(settings: &Settings, registry: &str) -> bool {
    let mirrors = settings.container_registry.as_ref().map(|c| c.mirror_list()).unwrap_or_default();
    mirrors
        .iter()
        .filter(|m| m.registry == registry)
        .any(|m| m.endpoint.iter().any(|e| e.starts_with("http://")))
}

/// The login `settings.container-registry.credentials` gives `registry` (`user:password`, from
/// `username` and `password` or from `auth`), for a host container's pull. `docker.io` names
/// Docker Hub under either of its names.
fn registry_login(settings: &Settings, registry: &str) -> Option<String> {
    let hub = |r: &str| if r == "registry-1.docker.io" { "docker.io" } else { r }.to_string();
    let creds = settings.container_registry.as_ref()?.credentials.as_ref()?;
    let c = creds.iter().find(|c| hub(&c.registry) == hub(registry))?;
    match (&c.username, &c.password, &c.auth) {
        (Some(u), Some(p), _) => Some(format!("{u}:{p}")),
        (_, _, Some(a)) => crate::settings::kubelet::base64_decode(a).and_then(|b| String::from_utf8(b).ok()),
        _ => None,
    }
}

/// Host containers as settings describe them: (spec, enabled) for each one with a source.
fn host_containers(settings: &Settings) -> Vec<(ServiceSpec, bool)> {
    settings
        .host_containers
        .iter()
        .flatten()
        .filter_map(|(name, hc)| {
            let source = hc.source.as_deref()?;
            let registry = crate::supervisor::host_container::registry_of(source);
            let plain_http = insecure_registry(settings, registry);
            let mut env = [render::proxy_env(settings), render::aws_env(settings)].concat();
            if let Some(login) = registry_login(settings, registry) {
                env.push((crate::supervisor::host_container::PULL_LOGIN_ENV.into(), login));
            }
            Some((
                host_container(
                    name,
                    source,
                    hc.superpowered.unwrap_or(false),
                    plain_http,
                    hc.user_data.as_deref(),
                    env,
                ),
                hc.enabled.unwrap_or(false),
            ))
        })
        .collect()
}

/// kubelet, when `settings.kubernetes` configures it (absent when the image has no kubelet).
fn kubelet(settings: &Settings) -> Option<ServiceSpec> {
    let k = crate::settings::kubelet::configured(settings)?;
    let argv = crate::settings::kubelet::argv(k);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut s = ServiceSpec::new("kubelet", &argv);
    s.deps = vec!["containerd".into()];
    s.env.extend(render::proxy_env(settings));
    s.env.extend(render::aws_env(settings));
    Some(s)
}

/// Bring the supervisor in line with settings that were just applied (`changed` keys, or all).
pub fn on_settings_applied(sup: &Mutex<Supervisor>, settings: &Settings, changed: Option<&[String]>) {
    let touched = |group: &str| {
        changed.is_none_or(|c| c.iter().any(|k| k == group || k.starts_with(&format!("{group}."))))
    };
    let mut sup = sup.lock().unwrap_or_else(|p| p.into_inner());
    // containerd reads its configuration and trust bundle (settings.pki) once, at start; a
    // new environment (the proxy) restarts it through `ensure`.
    if touched("network") {
        sup.ensure(containerd(settings));
    }
    if [
        "container-registry",
        "pki",
        "container-runtime",
        "oci-defaults",
        "kubernetes.pod-infra-container-image",
    ]
    .iter()
    .any(|g| touched(g))
    {
        sup.restart("containerd");
    }
    if touched("kubernetes") || touched("network") || touched("aws") {
        match kubelet(settings) {
            Some(spec) => sup.ensure(spec),
            None => sup.disable("kubelet"),
        }
    }
    if touched("host-containers") || touched("container-registry") || touched("network") || touched("aws") {
        let wanted = host_containers(settings);
        // Removed from settings (or left without a source): stopped like a disabled one.
        for name in sup.names() {
            if name.starts_with(HOST_CONTAINER_PREFIX) && !wanted.iter().any(|(s, _)| s.name == name) {
                sup.disable(&name);
            }
        }
        for (spec, enabled) in wanted {
            if enabled {
                sup.ensure(spec);
            } else {
                sup.disable(&spec.name);
            }
        }
    }
}

/// Start containerd as soon as its inputs are there (its configuration, rendered from settings
/// by the phase before; DATA for /var/lib/containerd; the SELinux policy): before the rest of
/// the settings, the network, the updater and the API, which it does not need. The other
/// services are declared later ([`declare`]). Its program was read ahead by stage 1
/// (`boot::prefetch`).
pub fn start_containerd(ctx: &mut Ctx) -> Result<(), crate::boot::BootError> {
    let settings = ctx.store.as_ref().map(|s| s.settings()).unwrap_or_default();
    let sup = Supervisor::new(vec![containerd(&settings)]);
    ctx.supervisor = Arc::new(Mutex::new(sup));
    super::lock(&ctx.supervisor).tick();
    Ok(())
}

pub fn declare(ctx: &mut Ctx) -> Result<(), crate::boot::BootError> {
    let mut specs = Vec::new();
    if let Some(store) = &ctx.store {
        let settings = store.settings();
        specs.extend(kubelet(&settings));
        specs.extend(host_containers(&settings).into_iter().filter(|(_, on)| *on).map(|(s, _)| s));
        specs.extend(super::bootstrap::service(&settings));
    }
    match ctx.cmdline.get("selftest") {
        Some("crashloop") => specs.push(crashloop()),
        Some("orphans") => specs.push(orphans()),
        Some("logflood") => specs.push(logflood()),
        Some("apiflood") => specs.push(apiflood()),
        _ => {}
    }
    let mut sup = super::lock(&ctx.supervisor);
    for spec in specs {
        sup.ensure(spec);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: serde_json::Value) -> Settings {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_host_container_pull_presents_its_registrys_login() {
        let s = settings(serde_json::json!({
            "container-registry": {"credentials": [
                {"registry": "r.example:5000", "username": "u", "password": "p:w"},
                {"registry": "docker.io", "auth": "aHViOnNlY3JldA=="},
                {"registry": "token.example", "identitytoken": "t"},
            ]},
            "host-containers": {
                "a": {"source": "r.example:5000/admin:1", "enabled": true},
                "b": {"source": "registry-1.docker.io/library/busybox:1", "enabled": true},
                "c": {"source": "token.example/x:1", "enabled": true},
                "d": {"source": "other.example/x:1", "enabled": true},
            },
        }));
        let login = |name: &str| {
            let (spec, _) = host_containers(&s)
                .into_iter()
                .find(|(spec, _)| spec.name == format!("host-containers@{name}"))
                .unwrap();
            spec.env
                .iter()
                .find(|(k, _)| k == crate::supervisor::host_container::PULL_LOGIN_ENV)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(login("a").as_deref(), Some("u:p:w"));
        assert_eq!(login("b").as_deref(), Some("hub:secret"));
        assert_eq!(login("c"), None, "an identity token is not a login ctr can present");
        assert_eq!(login("d"), None);
    }
}
