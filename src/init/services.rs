//! The services PID 1 supervises, declared as data: containerd (with the configuration
//! rendered from settings under /etc/containerd), and the self-test services that QEMU tests
//! switch on with `berth.selftest=`.

use std::sync::{Arc, Mutex};

use super::Ctx;
use crate::supervisor::{Ready, Restart, ServiceSpec, Supervisor};

pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

fn containerd() -> ServiceSpec {
    let mut s =
        ServiceSpec::new("containerd", &["/usr/bin/containerd", "--config", "/etc/containerd/config.toml"]);
    s.ready = Ready::Socket(CONTAINERD_SOCKET.into());
    // /etc is rendered at boot; the CA bundle ships in the read-only root.
    s.env.push(("SSL_CERT_FILE".into(), "/usr/share/berth/ca-certificates.crt".into()));
    s
}

/// `berth.selftest=crashloop`: a service that fails at once, every time, so the backoff can be
/// watched through the API.
fn crashloop() -> ServiceSpec {
    let mut s = ServiceSpec::new("crashloop", &["/usr/bin/berth", "selftest", "crash"]);
    s.restart = Restart::Always;
    s
}

/// `berth.selftest=orphans`: a one-shot task (see `init::selftest`).
fn orphans() -> ServiceSpec {
    let mut s = ServiceSpec::new("selftest-orphans", &["/usr/bin/berth", "selftest", "orphans"]);
    s.restart = Restart::Never;
    s
}

pub fn declare(ctx: &mut Ctx) -> Result<(), String> {
    let mut specs = vec![containerd()];
    match ctx.cmdline.get("selftest") {
        Some("crashloop") => specs.push(crashloop()),
        Some("orphans") => specs.push(orphans()),
        _ => {}
    }
    ctx.supervisor = Arc::new(Mutex::new(Supervisor::new(specs)));
    Ok(())
}
