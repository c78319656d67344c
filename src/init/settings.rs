//! Stage 2's settings phases: open the datastore on PRIVATE, apply user data once at first
//! boot, apply the settings (files under /etc, hostname, sysctls), and start the API with its
//! host bridge.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use serde_json::{json, Value};

use super::{Ctx, PRIVATE};
use crate::api::{self, routes};
use crate::boot::{partitions, report, BootError, Handoff};
use crate::settings::{render, Datastore};
use crate::sys;
use crate::userdata;

const USER_DATA_TX: &str = "user-data";

fn datastore_dir() -> std::path::PathBuf {
    Path::new(PRIVATE).join("datastore")
}

/// Where the outcome of the first boot's user data is kept (it is applied only once).
fn user_data_state() -> std::path::PathBuf {
    Path::new(PRIVATE).join("user-data.json")
}

/// Where the settings live when PRIVATE cannot hold them (memory: lost at the next boot).
const FALLBACK_DATASTORE: &str = "/run/berth/datastore";

/// Open the datastore. What it had to set aside is noticed; a datastore that cannot be opened
/// at all is fatal on trial and replaced by one in memory on a known-good slot.
pub fn open_datastore(ctx: &mut Ctx) -> Result<(), BootError> {
    // Variant-only settings (settings.aws) are accepted on their variant only.
    crate::settings::model::set_variant(&ctx.handoff.variant);
    // settings.boot only where this boot's path lets Berth set the next command line.
    super::bootparams::declare_support(ctx);
    let store = match Datastore::open(&datastore_dir()) {
        Ok(s) => s,
        Err(e) => {
            ctx.degrade(
                BootError::Datastore(e),
                "the settings start empty in memory and are lost at the next boot",
            )?;
            Datastore::open(Path::new(FALLBACK_DATASTORE)).map_err(BootError::Datastore)?
        }
    };
    for n in store.notices() {
        report::notice(n.clone());
    }
    ctx.store = Some(store);
    Ok(())
}

/// First boot: keep the BOOT partition's `net.toml` (Bottlerocket's network configuration for
/// bare metal) on PRIVATE, where the network phase reads it on this and every later boot.
fn keep_net_toml(boot: &Path) {
    let src = boot.join("net.toml");
    let Ok(md) = fs::metadata(&src) else {
        return;
    };
    let max = crate::net::nettoml::MAX_BYTES as u64;
    let kept = if md.len() > max {
        Err(format!("larger than {max} bytes"))
    } else {
        fs::read(&src).map_err(|e| e.to_string()).and_then(|b| {
            crate::settings::store::write_atomic(Path::new(super::network::NET_TOML), &b)
                .map_err(|e| e.to_string())
        })
    };
    match kept {
        Ok(()) => info!("net.toml from the BOOT partition kept as {}", super::network::NET_TOML),
        Err(e) => report::notice(format!("net.toml on the BOOT partition: {e}; not used")),
    }
}

/// Fetch user data from the platform's providers (IMDS at `imds`, on EC2). The slot's BOOT
/// partition (on a Raspberry Pi the first partition, `BERTH-AUTOBOOT`, the one a desktop shows
/// when the SD card is plugged in) is mounted read-only for the time it takes to look for
/// `user-data.toml` there.
fn fetch(
    handoff: &Handoff,
    parts: &[partitions::PartInfo],
    imds: Option<std::net::SocketAddr>,
) -> Result<Option<userdata::UserData>, String> {
    let sysfs = Path::new("/sys");
    let label = match handoff.boot.as_str() {
        "rpi" => crate::bootctl::rpi::LABEL.to_string(),
        _ => handoff.slot.label("BOOT"),
    };
    let with_boot = partitions::by_label(parts, &label)
        .and_then(|b| {
            partitions::with_boot_mounted(b, |dir| {
                keep_net_toml(dir);
                userdata::fetch(sysfs, Some(dir), imds)
            })
        })
        .map_err(|e| e.to_string());
    match with_boot {
        Ok(r) => r,
        // No BOOT partition to look in: the other providers still count.
        Err(_) => userdata::fetch(sysfs, None, imds),
    }
    .map_err(|e| e.to_string())
}

/// First boot only: apply user data as one transaction. Bad user data is reported (console and
/// `GET /user-data`) and does not stop the boot.
pub fn apply_user_data(ctx: &mut Ctx) -> Result<(), BootError> {
    let state_path = user_data_state();
    if let Ok(text) = fs::read_to_string(&state_path) {
        ctx.user_data = serde_json::from_str(&text).unwrap_or(Value::Null);
        return Ok(());
    }
    // On EC2 the network phase ran first; IMDS answers once the interface has its address.
    let imds = ctx.ec2.then_some(userdata::IMDS_ADDR);
    if imds.is_some() {
        if let Err(e) = ctx.network.wait(super::network::WAIT_LIMIT) {
            warn!("user data: the network is not up ({e}); EC2 IMDS cannot answer");
        }
    }
    let fetched = fetch(&ctx.handoff, &ctx.parts, imds);
    let store = ctx.store.as_mut().ok_or(BootError::Order { needs: "the datastore" })?;
    let outcome = match fetched {
        Ok(None) => json!({"source": null, "applied": false, "message": "no user data"}),
        Ok(Some(ud)) => {
            let source = ud.source.to_string();
            let _ = store.delete(USER_DATA_TX);
            match store.patch(USER_DATA_TX, &ud.settings).and_then(|_| store.commit(USER_DATA_TX)) {
                Ok(changed) => {
                    info!("user data from {source} applied: {}", changed.join(", "));
                    json!({"source": source, "applied": true, "changed": changed})
                }
                Err(e) => {
                    let _ = store.delete(USER_DATA_TX);
                    error!("user data from {source} rejected: {e}");
                    json!({"source": source, "applied": false, "error": e.to_string()})
                }
            }
        }
        Err(e) => {
            error!("user data: {e}");
            json!({"source": null, "applied": false, "error": e})
        }
    };
    if let Err(e) = crate::settings::store::write_atomic(&state_path, outcome.to_string().as_bytes()) {
        warn!("recording the user-data outcome: {e}");
    }
    ctx.user_data = outcome;
    Ok(())
}

/// The setting groups whose rendered files containerd reads when it starts: its configuration
/// (`containerd/config.toml`, from these groups and `kubernetes.pod-infra-container-image`,
/// which it is rendered from whatever group asks) and CRI's base OCI spec (`oci-defaults`).
const CONTAINERD_GROUPS: &[&str] = &["container-registry", "container-runtime", "oci-defaults"];

/// Render only what containerd reads at its start, so that it can start before the rest of the
/// settings are applied ([`apply_settings`] comes after it). User data is in the datastore
/// already (its phase comes first), so a first boot's containerd settings are in effect from
/// containerd's first start. The trust bundle (`settings.pki`, containerd's `SSL_CERT_FILE`)
/// is not among them: Go reads it at the first TLS handshake, and nothing asks containerd to
/// pull before the services and the API, which come after [`apply_settings`].
pub fn render_containerd_config(ctx: &mut Ctx) -> Result<(), BootError> {
    let settings = ctx.store.as_ref().ok_or(BootError::Order { needs: "the datastore" })?.settings();
    match render_for_containerd(&settings, Path::new("/etc"), &render::RealHost) {
        Ok(done) => info!("containerd's configuration rendered: {}", done.len()),
        Err(e) => error!("rendering containerd's configuration: {e}"),
    }
    Ok(())
}

fn render_for_containerd(
    settings: &crate::settings::model::Settings,
    etc: &Path,
    host: &dyn render::Host,
) -> Result<Vec<String>, String> {
    let groups: Vec<String> = CONTAINERD_GROUPS.iter().map(|g| g.to_string()).collect();
    render::apply(settings, Some(&groups), etc, host)
}

/// Apply all the settings: every file under /etc (containerd's again, the same text), the
/// hostname, sysctls.
pub fn apply_settings(ctx: &mut Ctx) -> Result<(), BootError> {
    let settings = ctx.store.as_ref().ok_or(BootError::Order { needs: "the datastore" })?.settings();
    match render::apply(&settings, None, Path::new("/etc"), &render::RealHost) {
        Ok(done) => info!("settings applied: {}", done.len()),
        // A bad sysctl must not stop the boot; it is logged and visible in the settings.
        Err(e) => error!("applying settings: {e}"),
    }
    Ok(())
}

pub fn start_api(ctx: &mut Ctx) -> Result<(), BootError> {
    let store = ctx.store.take().ok_or(BootError::Order { needs: "the datastore" })?;
    let h = &ctx.handoff;
    crate::ephemeral::enable();
    let api = routes::Api {
        store: Mutex::new(store),
        etc: "/etc".into(),
        host: Box::new(render::RealHost),
        os: routes::OsInfo {
            version: h.version.clone(),
            variant: h.variant.clone(),
            arch: std::env::consts::ARCH.into(),
            build_id: h.root_hash.chars().take(12).collect(),
            slot: h.slot.to_string(),
        },
        actions: Box::new(|a| {
            let sig = match a {
                routes::Action::Reboot => libc::SIGTERM,
                routes::Action::Shutdown => libc::SIGPWR,
            };
            // Let the 202 reach the client before shutdown starts.
            let _ = std::thread::Builder::new().name("action".into()).spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let _ = sys::kill(1, sig);
            });
        }),
        user_data: Mutex::new(ctx.user_data.clone()),
        services: Some(ctx.supervisor.clone()),
        on_applied: {
            let sup = ctx.supervisor.clone();
            Box::new(move |settings, changed| super::services::on_settings_applied(&sup, settings, changed))
        },
        updater: ctx.updater.clone(),
    };
    let socket = Path::new(api::SOCKET);
    let listener = api::listen(socket, Some(api::API_GID)).map_err(BootError::io("listen on", socket))?;
    // The accept loop and the host bridge are supervised tasks: if one dies it starts again
    // (the same listening socket, so clients never see it disappear).
    let api = Arc::new(api);
    ctx.tasks.add("api", move || {
        let listener = listener.try_clone()?;
        api::spawn(api.clone(), listener)
    });
    if api::bridge::available() {
        ctx.tasks.add("api-bridge", move || api::bridge::spawn(socket.to_path_buf()));
        info!("api bridge to the host started");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host whose every effect fails the test: containerd's files need none.
    struct NoHost;

    impl render::Host for NoHost {
        fn set_hostname(&self, name: &str) -> std::io::Result<()> {
            panic!("hostname {name} set before containerd")
        }
        fn write_sysctl(&self, key: &str, _: &str) -> std::io::Result<()> {
            panic!("sysctl {key} written before containerd")
        }
        fn hostname(&self) -> std::io::Result<String> {
            unreachable!()
        }
        fn read_sysctl(&self, _: &str) -> std::io::Result<String> {
            unreachable!()
        }
        fn set_lockdown(&self, level: &str) -> std::io::Result<()> {
            panic!("lockdown {level} set before containerd")
        }
    }

    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
        out.sort();
        out
    }

    #[test]
    fn containerd_starts_with_its_settings_and_nothing_else_rendered() {
        let etc = crate::testing::TempDir::new("containerd-first");
        let settings = crate::settings::model::parse(&json!({
            "container-registry": {"mirrors": [{"registry": "docker.io", "endpoint": ["http://10.0.2.2:5000"]}]},
            "oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": 4096, "soft-limit": 1024}}},
            "kubernetes": {"pod-infra-container-image": "registry.example/pause:1"},
            "network": {"hostname": "n1"},
            "kernel": {"sysctl": {"vm.swappiness": "7"}, "lockdown": "integrity"},
            "motd": "hi",
        }))
        .unwrap();
        render_for_containerd(&settings, etc.path(), &NoHost).unwrap();
        let d = etc.path().display();
        assert_eq!(
            files_under(etc.path()),
            vec![format!("{d}/containerd/config.toml"), format!("{d}/containerd/cri-base.json")]
        );
        let config = fs::read_to_string(etc.path().join("containerd/config.toml")).unwrap();
        assert!(config.contains("http://10.0.2.2:5000"), "{config}");
        assert!(config.contains("registry.example/pause:1"), "{config}");
        let base = fs::read_to_string(etc.path().join("containerd/cri-base.json")).unwrap();
        assert!(base.contains("RLIMIT_NOFILE"), "{base}");
    }
}
