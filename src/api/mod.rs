//! The settings API: HTTP/1.1 on a Unix socket (`/run/api.sock`, mode 0660, root:api).
//!
//! [`crate::http::server`] is the server (limits, timeouts, bounded connections, eviction of
//! idle ones), [`routes`] maps requests to the datastore and actions ([`keys`]: Bottlerocket's
//! dotted key names and prefixes), [`bridge`] carries the
//! API over a virtio-serial port so the host running a VM can reach it, [`bench`] is the load
//! generator of `scripts/bench api`. `berth serve` runs it in dev mode on a developer machine.

pub mod bench;
pub mod bridge;
pub mod exec;
pub mod keys;
pub mod report;
pub mod routes;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use log::info;
use serde_json::json;

use crate::http::server::{self as http, Handler};
use crate::settings::{render, Datastore};
use routes::{Action, Api, OsInfo};

pub const SOCKET: &str = "/run/api.sock";
/// The `api` group may use the socket (its gid is fixed in /etc/group).
pub const API_GID: u32 = 274;

/// Bind the socket at `path` (replacing a stale one) with mode 0660 and group `gid`.
pub fn listen(path: &Path, gid: Option<u32>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(g))?;
    }
    Ok(l)
}

/// Serve `api` on `listener` in a thread named "api" (PID 1 supervises it: the thread only
/// ends when the accept loop fails).
pub fn spawn(
    api: Arc<Api>,
    listener: UnixListener,
) -> io::Result<std::thread::JoinHandle<Result<(), String>>> {
    let handler: Handler = Arc::new(move |r| api.handle(r));
    std::thread::Builder::new().name("api".into()).spawn(move || {
        http::serve(listener, http::Limits::default(), handler, Arc::new(AtomicBool::new(false)));
        Err("the accept loop ended".into())
    })
}

/// `berth serve --state-dir DIR --socket PATH`: settings and API on a developer machine, with no
/// PID 1 duties. Files are rendered into DIR/etc; hostname and sysctl changes are recorded in
/// DIR/host; reboot/shutdown requests are appended to DIR/actions.log. The host is never changed.
pub fn serve_dev(args: &[String]) -> Result<(), String> {
    let usage = "usage: berth serve --state-dir DIR --socket PATH";
    let (mut state, mut socket) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--state-dir" => state = it.next().map(PathBuf::from),
            "--socket" => socket = it.next().map(PathBuf::from),
            _ => return Err(format!("unknown argument '{a}'\n{usage}")),
        }
    }
    let (Some(state), Some(socket)) = (state, socket) else {
        return Err(usage.into());
    };
    let store = Datastore::open(&state.join("datastore")).map_err(|e| e.to_string())?;
    let log = state.join("actions.log");
    let api = Api {
        store: Mutex::new(store),
        etc: state.join("etc"),
        host: Box::new(render::RecordingHost { dir: state.join("host") }),
        os: OsInfo {
            version: crate::VERSION.into(),
            variant: "dev".into(),
            arch: std::env::consts::ARCH.into(),
            build_id: "dev".into(),
            slot: "none".into(),
        },
        actions: Box::new(move |a: Action| {
            use std::io::Write;
            if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&log) {
                let _ = writeln!(f, "{a:?}");
            }
        }),
        user_data: Mutex::new(json!({"source": null, "applied": false})),
        services: None,
        on_applied: Box::new(|_, _| {}),
        updater: None,
    };
    let settings = api.store.lock().unwrap_or_else(|p| p.into_inner()).settings();
    render::apply(&settings, None, &api.etc, api.host.as_ref())
        .map_err(|e| format!("rendering settings: {e}"))?;
    let listener = listen(&socket, None).map_err(|e| format!("{}: {e}", socket.display()))?;
    info!("serving the API on {} (state in {})", socket.display(), state.display());
    let api = Arc::new(api);
    let handler: Handler = Arc::new(move |r| api.handle(r));
    http::serve(listener, http::Limits::default(), handler, Arc::new(AtomicBool::new(false)));
    Ok(())
}
