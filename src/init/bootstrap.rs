//! Bootstrap commands and containers (`settings.bootstrap-commands`,
//! `settings.bootstrap-containers`; the model and the order are in `settings::bootstrap`).
//!
//! When the settings name any to run, PID 1 declares one one-shot service, `bootstrap`
//! (`berth bootstrap`, after containerd when there are containers to run), and the boot is not
//! ready until it has exited ([`gate`]). The service reads the settings through the API, runs
//! each command line with `apiclient`, then each container to completion through
//! `supervisor::host_container` (superpowered: the host's `/` at `/.berth/rootfs`, its own
//! persistent directory `/local/bootstrap-containers/NAME`, seen at
//! `/.bottlerocket/bootstrap-containers/current`). A step whose mode is `once` sets its mode to
//! `off` after it succeeded (a settings commit through the API, so it does not run again).
//!
//! A failed step that is not essential is logged and the next one runs. A failed essential
//! step ends the service with status 1 and fails the boot: on a boot on trial PID 1 reboots and
//! the known-good slot takes over; on a known-good slot the failure is a notice (`GET /boot`)
//! and the boot goes on, because a known-good slot that reboots on every boot is a brick (the
//! same rule as the rest of the boot; see the `init` module docs). A bootstrap that never ends is
//! bounded by the boot's health timeout (`berth.health-timeout`, 300 s).
//!
//! Unlike Bottlerocket, host containers and kubelet are not held back until the bootstrap is
//! done: they start with containerd, while the boot's readiness waits for the bootstrap.

use log::error;

use super::Ctx;
use crate::apiclient::{Client, DEFAULT_SOCKET};
use crate::boot::{self, report};
use crate::settings::bootstrap::{plan, Step};
use crate::settings::model::Settings;
use crate::supervisor::host_container::{self, Kind};
use crate::supervisor::{Restart, ServiceSpec, Supervisor};

pub const SERVICE: &str = "bootstrap";

/// The `bootstrap` service, when the settings have something to run at this boot.
pub fn service(settings: &Settings) -> Option<ServiceSpec> {
    let steps = plan(settings);
    if steps.is_empty() {
        return None;
    }
    let mut s = ServiceSpec::new(SERVICE, &["/usr/bin/berth", "bootstrap"]);
    s.restart = Restart::Never;
    if steps.iter().any(|s| matches!(s, Step::Container { .. })) {
        s.deps = vec!["containerd".into()];
    }
    Some(s)
}

/// Whether the bootstrap lets the boot be ready: true once it has ended well (or there is
/// none). An essential failure reboots a boot on trial (see the module docs).
pub fn gate(ctx: &Ctx, sup: &Supervisor) -> bool {
    let Some(r) = sup.report_one(SERVICE) else { return true };
    match r["state"].as_str() {
        Some("exited") => {}
        Some("absent") => return true,
        _ => return false,
    }
    if r["last_exit"]["code"].as_i64() == Some(0) {
        return true;
    }
    let why =
        format!("an essential bootstrap step failed ({}); see GET /logs?service=bootstrap", r["last_exit"]);
    if ctx.handoff.on_trial {
        boot::fail_and_reboot(&why);
    }
    error!("{why} (slot already known good, the boot goes on)");
    report::notice(why);
    true
}

/// Set `step`'s mode to `off` (its `once` run is done).
fn turn_off(client: &Client, step: &Step) -> Result<(), String> {
    let key = step.mode_key();
    let mut body = serde_json::json!("off");
    for segment in key.split('.').skip(1).collect::<Vec<_>>().into_iter().rev() {
        body = serde_json::json!({ segment: body });
    }
    let tx = format!("bootstrap-{}", step.name());
    client
        .call("PATCH", &format!("/settings?tx={tx}"), Some(&body.to_string()))
        .map_err(|e| e.to_string())?;
    client.call("POST", &format!("/tx/commit_and_apply?tx={tx}"), None).map_err(|e| e.to_string())?;
    Ok(())
}

fn run_step(settings: &Settings, step: &Step) -> Result<(), String> {
    match step {
        Step::Command { lines, .. } => {
            for line in lines {
                let status = std::process::Command::new("/usr/bin/apiclient")
                    .args(line)
                    .status()
                    .map_err(|e| format!("/usr/bin/apiclient: {e}"))?;
                if !status.success() {
                    return Err(format!("`apiclient {}` failed ({status})", line.join(" ")));
                }
            }
            Ok(())
        }
        Step::Container { name, source, user_data, .. } => {
            let plain_http =
                super::services::insecure_registry(settings, host_container::registry_of(source));
            match host_container::run(Kind::Bootstrap, name, source, true, plain_http, user_data.as_deref()) {
                0 => Ok(()),
                code => Err(format!("container {source} exited with status {code}")),
            }
        }
    }
}

/// `berth bootstrap`: the service's process (see the module docs). Exit status 1 when an
/// essential step failed.
pub fn main() -> i32 {
    let client = Client::new(DEFAULT_SOCKET);
    let settings: Settings = match client
        .call("GET", "/settings", None)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bootstrap: reading the settings: {e}");
            return 1;
        }
    };
    for step in plan(&settings) {
        let what = match step {
            Step::Command { .. } => "bootstrap command",
            Step::Container { .. } => "bootstrap container",
        };
        eprintln!("bootstrap: running {what} {}", step.name());
        match run_step(&settings, &step) {
            Ok(()) => {
                eprintln!("bootstrap: {what} {} done", step.name());
                if step.once() {
                    if let Err(e) = turn_off(&client, &step) {
                        eprintln!("bootstrap: {what} {}: could not set its mode to off: {e}", step.name());
                    }
                }
            }
            Err(e) if step.essential() => {
                eprintln!("bootstrap: essential {what} {} failed: {e}", step.name());
                return 1;
            }
            Err(e) => eprintln!("bootstrap: {what} {} failed (not essential, going on): {e}", step.name()),
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_service_only_when_there_is_something_to_run() {
        let s = |v| serde_json::from_value::<Settings>(v).unwrap();
        assert!(service(&Settings::default()).is_none());
        assert!(service(&s(json!({"bootstrap-commands": {"a": {"mode": "off"}}}))).is_none());
        let cmd = service(&s(json!({"bootstrap-commands": {"a": {"mode": "once"}}}))).unwrap();
        assert!(cmd.deps.is_empty() && cmd.restart == Restart::Never && cmd.argv[1] == "bootstrap");
        let ctr = service(&s(json!({"bootstrap-containers": {"a": {"mode": "always", "source": "r/a:1"}}})))
            .unwrap();
        assert_eq!(ctr.deps, ["containerd"]);
    }
}
