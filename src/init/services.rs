//! The services PID 1 supervises, declared as data: containerd (with the configuration
//! rendered from settings under /etc/containerd), kubelet when `settings.kubernetes` configures
//! it, one `host-containers@NAME` per enabled host
//! container, and the self-test services that QEMU tests switch on with `berth.selftest=`.

use std::sync::{Arc, Mutex};

use super::Ctx;
use crate::settings::model::Settings;
use crate::supervisor::{Ready, Restart, ServiceSpec, Supervisor};
use crate::sys::CapabilitySet;

pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

fn containerd() -> ServiceSpec {
    let mut s =
        ServiceSpec::new("containerd", &["/usr/bin/containerd", "--config", "/etc/containerd/config.toml"]);
    s.ready = Ready::Socket(CONTAINERD_SOCKET.into());
    // The trust bundle rendered in /etc from the image's CAs and settings.pki.
    s.env.push(("SSL_CERT_FILE".into(), crate::http::tls::TRUST_BUNDLE.into()));
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
) -> ServiceSpec {
    let flag = |b: bool| if b { "1" } else { "0" };
    let mut s = ServiceSpec::new(
        &format!("{HOST_CONTAINER_PREFIX}{name}"),
        &["/usr/bin/berth", "host-container", name, source, flag(superpowered), flag(plain_http)],
    );
    s.deps = vec!["containerd".into()];
    if let Some(data) = user_data {
        s.env.push((crate::supervisor::host_container::USER_DATA_ENV.into(), data.into()));
    }
    s
}

/// Whether `settings.container-registry.mirrors` configures `registry` as insecure: one of its
/// endpoints is plain `http://`.
fn insecure_registry(settings: &Settings, registry: &str) -> bool {
    let mirrors = settings.container_registry.as_ref().and_then(|c| c.mirrors.as_ref());
    mirrors
        .into_iter()
        .flatten()
        .filter(|m| m.registry == registry)
        .any(|m| m.endpoint.iter().any(|e| e.starts_with("http://")))
}

/// Host containers as settings describe them: (spec, enabled) for each one with a source.
fn host_containers(settings: &Settings) -> Vec<(ServiceSpec, bool)> {
    settings
        .host_containers
        .iter()
        .flatten()
        .filter_map(|(name, hc)| {
            let source = hc.source.as_deref()?;
            let plain_http =
                insecure_registry(settings, crate::supervisor::host_container::registry_of(source));
            Some((
                host_container(
                    name,
                    source,
                    hc.superpowered.unwrap_or(false),
                    plain_http,
                    hc.user_data.as_deref(),
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
    Some(s)
}

/// Bring the supervisor in line with settings that were just applied (`changed` keys, or all).
pub fn on_settings_applied(sup: &Mutex<Supervisor>, settings: &Settings, changed: Option<&[String]>) {
    let touched = |group: &str| {
        changed.is_none_or(|c| c.iter().any(|k| k == group || k.starts_with(&format!("{group}."))))
    };
    let mut sup = sup.lock().unwrap_or_else(|p| p.into_inner());
    // containerd reads its trust bundle (settings.pki) and its config (sandbox image) once, at start.
    let sandbox_image = "kubernetes.pod-infra-container-image";
    let sandbox_touched = changed.is_none_or(|c| {
        c.iter()
            .any(|k| k == sandbox_image || k == "kubernetes" || k.starts_with(&format!("{sandbox_image}.")))
    });
    if touched("container-registry") || touched("pki") || sandbox_touched {
        sup.restart("containerd");
    }
    if touched("kubernetes") {
        match kubelet(settings) {
            Some(spec) => sup.ensure(spec),
            None => sup.disable("kubelet"),
        }
    }
    if touched("host-containers") || touched("container-registry") {
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

pub fn declare(ctx: &mut Ctx) -> Result<(), crate::boot::BootError> {
    let mut specs = vec![containerd()];
    if let Some(store) = &ctx.store {
        let settings = store.settings();
        specs.extend(kubelet(&settings));
        specs.extend(host_containers(&settings).into_iter().filter(|(_, on)| *on).map(|(s, _)| s));
    }
    match ctx.cmdline.get("selftest") {
        Some("crashloop") => specs.push(crashloop()),
        Some("orphans") => specs.push(orphans()),
        Some("logflood") => specs.push(logflood()),
        Some("apiflood") => specs.push(apiflood()),
        _ => {}
    }
    ctx.supervisor = Arc::new(Mutex::new(Supervisor::new(specs)));
    Ok(())
}
